//! Test builders of small Part-10 files (Explicit VR Little Endian), shared
//! by the `sr` and `validate` unit tests.

/// Append one Explicit VR Little Endian element with the value as given
/// (an odd length is kept, for tests of odd lengths).
pub(crate) fn el_raw(out: &mut Vec<u8>, g: u16, e: u16, vr: &[u8; 2], v: &[u8]) {
    out.extend_from_slice(&g.to_le_bytes());
    out.extend_from_slice(&e.to_le_bytes());
    out.extend_from_slice(vr);
    if crate::dicom::prescan::long_vr(*vr) {
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    } else {
        out.extend_from_slice(&(v.len() as u16).to_le_bytes());
    }
    out.extend_from_slice(v);
}

/// Append one element padded to an even length (NUL for UI and OB, a space
/// for the other VRs).
pub(crate) fn el(out: &mut Vec<u8>, g: u16, e: u16, vr: &[u8; 2], v: &[u8]) {
    let mut v = v.to_vec();
    if v.len() % 2 == 1 {
        v.push(if vr == b"UI" || vr == b"OB" { 0 } else { b' ' });
    }
    el_raw(out, g, e, vr, &v);
}

/// The identifying elements of a test file, each written as given (no
/// padding); `None` leaves the element out.
pub(crate) struct Ids<'a> {
    /// SOPClassUID (0008,0016).
    pub class: &'a [u8],
    /// SOPInstanceUID (0008,0018).
    pub instance: &'a [u8],
    /// PatientName (0010,0010).
    pub patient_name: Option<&'a [u8]>,
    /// PatientID (0010,0020).
    pub patient_id: Option<&'a [u8]>,
}

/// A Part-10 file: preamble, `DICM`, the meta group (Explicit VR Little
/// Endian), then `ids`, StudyInstanceUID `1.2.3`, SeriesInstanceUID
/// `1.2.3.1`, then the data set elements `rest` (in tag order).
pub(crate) fn part10(ids: &Ids<'_>, rest: &[u8]) -> Vec<u8> {
    let mut meta = Vec::new();
    el(&mut meta, 0x0002, 0x0010, b"UI", b"1.2.840.10008.1.2.1");
    let mut f = vec![0u8; 128];
    f.extend_from_slice(b"DICM");
    el(
        &mut f,
        0x0002,
        0x0000,
        b"UL",
        &(meta.len() as u32).to_le_bytes(),
    );
    f.extend_from_slice(&meta);
    el_raw(&mut f, 0x0008, 0x0016, b"UI", ids.class);
    el_raw(&mut f, 0x0008, 0x0018, b"UI", ids.instance);
    if let Some(name) = ids.patient_name {
        el_raw(&mut f, 0x0010, 0x0010, b"PN", name);
    }
    if let Some(id) = ids.patient_id {
        el_raw(&mut f, 0x0010, 0x0020, b"LO", id);
    }
    el(&mut f, 0x0020, 0x000D, b"UI", b"1.2.3");
    el(&mut f, 0x0020, 0x000E, b"UI", b"1.2.3.1");
    f.extend_from_slice(rest);
    f
}
