//! DIMSE messages of the C-STORE, C-FIND and C-GET SCU (and of the C-STORE
//! SCP role a C-GET needs), encoded and parsed by hand.
//!
//! Command sets are always Implicit VR Little Endian (PS3.7 §6.3.1) and
//! flat: a handful of group-0000 elements with defined lengths. Writing
//! them by hand is ten lines per message and needs no dependency; parsing
//! them by hand keeps an untrusted peer's bytes away from dicom-object,
//! which aborts the process on deeply nested sequences (see
//! `relaypacs_core::dicom`). C-FIND identifiers are parsed the same way,
//! with a bounded depth for any sequence the peer adds.

use relaypacs_core::InstanceOutcome;

/// Implicit VR Little Endian.
pub(super) const IMPLICIT_VR_LE: &str = "1.2.840.10008.1.2";
/// Study Root Query/Retrieve Information Model - FIND.
pub(super) const STUDY_ROOT_FIND: &str = "1.2.840.10008.5.1.4.1.2.2.1";
/// Study Root Query/Retrieve Information Model - GET.
pub(super) const STUDY_ROOT_GET: &str = "1.2.840.10008.5.1.4.1.2.2.3";

/// (0000,0100) Command Field values.
pub(super) const C_STORE_RQ: u16 = 0x0001;
pub(super) const C_STORE_RSP: u16 = 0x8001;
pub(super) const C_FIND_RQ: u16 = 0x0020;
pub(super) const C_FIND_RSP: u16 = 0x8020;
pub(super) const C_GET_RQ: u16 = 0x0010;
pub(super) const C_GET_RSP: u16 = 0x8010;

/// (0000,0800) Command Data Set Type: "no data set".
const NO_DATA_SET: u16 = 0x0101;
/// (0000,0700) Priority: medium.
const PRIORITY_MEDIUM: u16 = 0x0000;

/// Bytes of a P-DATA-TF PDU before the PDV value: PDU type, reserved,
/// PDU length (4), PDV item length (4), presentation context id, message
/// control header.
pub(super) const PDATA_HEADER: usize = 12;
/// Bytes of a PDV item counted in the negotiated maximum PDU length besides
/// the value itself: item length (4), context id, message control header.
pub(super) const PDV_OVERHEAD: u32 = 6;

/// Fill in the 12-byte P-DATA-TF header at the front of `buf`, whose value
/// (everything after the header) is one PDV.
pub(super) fn set_pdata_header(buf: &mut [u8], context_id: u8, command: bool, last: bool) {
    let value_len = buf.len() - PDATA_HEADER;
    // value_len is at most the negotiated maximum PDU length (u32).
    let pdv_len = (value_len as u32) + 2;
    let pdu_len = pdv_len + 4;
    buf[0] = 0x04;
    buf[1] = 0x00;
    buf[2..6].copy_from_slice(&pdu_len.to_be_bytes());
    buf[6..10].copy_from_slice(&pdv_len.to_be_bytes());
    buf[10] = context_id;
    buf[11] = u8::from(command) | (u8::from(last) << 1);
}

fn element(out: &mut Vec<u8>, group: u16, elem: u16, value: &[u8]) {
    out.extend_from_slice(&group.to_le_bytes());
    out.extend_from_slice(&elem.to_le_bytes());
    // Values here are UIDs (≤ 64 bytes) and 2-byte integers.
    out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    out.extend_from_slice(value);
}

/// A UID value padded to even length with NUL (PS3.5 §9.1).
fn uid_value(uid: &str) -> Vec<u8> {
    let mut v = uid.as_bytes().to_vec();
    if v.len() % 2 == 1 {
        v.push(0);
    }
    v
}

/// A command set: the given elements (sorted by element number, all in
/// group 0000) preceded by (0000,0000) Command Group Length.
fn command(elements: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut body = Vec::with_capacity(256);
    for (elem, value) in elements {
        element(&mut body, 0x0000, *elem, value);
    }
    let mut out = Vec::with_capacity(body.len() + 12);
    element(&mut out, 0x0000, 0x0000, &(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// C-STORE-RQ (PS3.7 §9.3.1.1) with a data set following.
pub(super) fn c_store_rq(sop_class: &str, sop_instance: &str, message_id: u16) -> Vec<u8> {
    command(&[
        (0x0002, uid_value(sop_class)),
        (0x0100, C_STORE_RQ.to_le_bytes().to_vec()),
        (0x0110, message_id.to_le_bytes().to_vec()),
        (0x0700, PRIORITY_MEDIUM.to_le_bytes().to_vec()),
        (0x0800, 0x0000u16.to_le_bytes().to_vec()),
        (0x1000, uid_value(sop_instance)),
    ])
}

/// C-FIND-RQ (PS3.7 §9.3.2.1) in the Study Root model, identifier following.
pub(super) fn c_find_rq(message_id: u16) -> Vec<u8> {
    command(&[
        (0x0002, uid_value(STUDY_ROOT_FIND)),
        (0x0100, C_FIND_RQ.to_le_bytes().to_vec()),
        (0x0110, message_id.to_le_bytes().to_vec()),
        (0x0700, PRIORITY_MEDIUM.to_le_bytes().to_vec()),
        (0x0800, 0x0000u16.to_le_bytes().to_vec()),
    ])
}

/// The C-FIND identifier (Implicit VR Little Endian) asking for the SOP
/// Instance UIDs of one series at IMAGE level.
pub(super) fn image_level_query(study: &str, series: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(192);
    element(&mut out, 0x0008, 0x0018, b""); // SOPInstanceUID: return key
    element(&mut out, 0x0008, 0x0052, b"IMAGE "); // QueryRetrieveLevel
    element(&mut out, 0x0020, 0x000D, &uid_value(study));
    element(&mut out, 0x0020, 0x000E, &uid_value(series));
    out
}

/// C-GET-RQ (PS3.7 §9.3.3.1) in the Study Root model, identifier following.
pub(super) fn c_get_rq(message_id: u16) -> Vec<u8> {
    command(&[
        (0x0002, uid_value(STUDY_ROOT_GET)),
        (0x0100, C_GET_RQ.to_le_bytes().to_vec()),
        (0x0110, message_id.to_le_bytes().to_vec()),
        (0x0700, PRIORITY_MEDIUM.to_le_bytes().to_vec()),
        (0x0800, 0x0000u16.to_le_bytes().to_vec()),
    ])
}

/// The C-GET identifier (Implicit VR Little Endian) naming one instance at
/// IMAGE level by its unique keys (PS3.4 §C.4.3.2.1).
pub(super) fn image_level_keys(study: &str, series: &str, sop_instance: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    element(&mut out, 0x0008, 0x0018, &uid_value(sop_instance));
    element(&mut out, 0x0008, 0x0052, b"IMAGE ");
    element(&mut out, 0x0020, 0x000D, &uid_value(study));
    element(&mut out, 0x0020, 0x000E, &uid_value(series));
    out
}

/// C-STORE-RSP (PS3.7 §9.3.1.2) to a C-STORE sub-operation of a C-GET.
pub(super) fn c_store_rsp(
    sop_class: &str,
    sop_instance: &str,
    responding_to: u16,
    status: u16,
) -> Vec<u8> {
    command(&[
        (0x0002, uid_value(sop_class)),
        (0x0100, C_STORE_RSP.to_le_bytes().to_vec()),
        (0x0120, responding_to.to_le_bytes().to_vec()),
        (0x0800, NO_DATA_SET.to_le_bytes().to_vec()),
        (0x0900, status.to_le_bytes().to_vec()),
        (0x1000, uid_value(sop_instance)),
    ])
}

/// (0000,1020)-(0000,1023): the sub-operation counts of a C-GET response,
/// each present or not (PS3.7 §9.3.3.2).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SubOperations {
    /// Number of Remaining Sub-operations.
    pub remaining: Option<u16>,
    /// Number of Completed Sub-operations.
    pub completed: Option<u16>,
    /// Number of Failed Sub-operations.
    pub failed: Option<u16>,
    /// Number of Warning Sub-operations.
    pub warning: Option<u16>,
}

/// The fields of a command set that the SCU acts on (a response, or a
/// C-STORE-RQ sub-operation of a C-GET).
#[derive(Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Response {
    /// (0000,0100) Command Field.
    pub command_field: u16,
    /// (0000,0110) Message ID (requests; 0 if absent).
    pub message_id: u16,
    /// (0000,0120) Message ID Being Responded To.
    pub responding_to: u16,
    /// (0000,0900) Status (0 in a request, which has none).
    pub status: u16,
    /// (0000,0800) Command Data Set Type: whether a data set follows.
    pub has_data_set: bool,
    /// (0000,0902) Error Comment, sanitised.
    pub error_comment: Option<String>,
    /// (0000,0002) Affected SOP Class UID, sanitised, without padding.
    pub affected_sop_class: Option<String>,
    /// (0000,1000) Affected SOP Instance UID, sanitised, without padding.
    pub affected_sop_instance: Option<String>,
    /// C-GET sub-operation counts.
    pub sub_operations: SubOperations,
}

/// Why a command set or an identifier from the peer was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum DimseError {
    /// The bytes end inside an element header.
    TruncatedHeader {
        /// `"command set"` or `"identifier"`.
        what: &'static str,
    },
    /// A command element's value runs past the end.
    CommandOverrun {
        /// The element's (group, element).
        tag: (u16, u16),
    },
    /// An identifier element's value runs past the end.
    IdentifierOverrun,
    /// A US value that is not 2 bytes long.
    UsLength(usize),
    /// A required command element is missing (its name).
    Missing(&'static str),
    /// Sequences nest deeper than the limit.
    TooDeep {
        /// The limit.
        limit: u32,
    },
    /// An element other than an item inside a sequence.
    NonItem,
}

impl std::fmt::Display for DimseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TruncatedHeader { what } => write!(f, "{what} ends inside an element header"),
            Self::CommandOverrun { tag: (g, e) } => {
                write!(f, "command element ({g:04X},{e:04X}) overruns")
            }
            Self::IdentifierOverrun => f.write_str("identifier element overruns"),
            Self::UsLength(n) => write!(f, "a US value of {n} bytes"),
            Self::Missing(what) => write!(f, "no {what}"),
            Self::TooDeep { limit } => write!(f, "identifier nests deeper than {limit}"),
            Self::NonItem => f.write_str("a non-item inside a sequence"),
        }
    }
}

impl std::error::Error for DimseError {}

fn u16_value(v: &[u8]) -> Result<u16, DimseError> {
    match v {
        [a, b] => Ok(u16::from_le_bytes([*a, *b])),
        _ => Err(DimseError::UsLength(v.len())),
    }
}

/// Printable ASCII only, trimmed, at most 256 characters: text from the
/// peer goes into reasons and logs.
fn sanitise(v: &[u8]) -> String {
    let s: String = v
        .iter()
        .take(256)
        .map(|&b| {
            if (0x20..0x7F).contains(&b) {
                char::from(b)
            } else {
                '?'
            }
        })
        .collect();
    s.trim_matches(|c| c == ' ' || c == '?').to_owned()
}

/// A UID value from the peer: padding removed, sanitised, `None` if empty.
fn uid_of(v: &[u8]) -> Option<String> {
    let end = v
        .iter()
        .rposition(|&b| b != 0 && b != b' ')
        .map_or(0, |i| i + 1);
    Some(sanitise(&v[..end])).filter(|s| !s.is_empty())
}

/// Parse a response command set (flat, Implicit VR Little Endian): a
/// C-STORE-RSP, C-FIND-RSP or C-GET-RSP. Pure and bounded: the strings it
/// keeps are sanitised to at most 256 characters.
///
/// # Errors
/// [`DimseError`] for a truncated or overrunning element, a US value that
/// is not 2 bytes, or a missing Command Field, Status or Command Data Set
/// Type.
pub fn parse_response(bytes: &[u8]) -> Result<Response, DimseError> {
    parse_command(bytes, true)
}

/// Parse a request command set (a C-STORE-RQ sub-operation), which has no
/// Status but a Message ID.
///
/// # Errors
/// As [`parse_response`], without the need for a Status.
pub fn parse_request(bytes: &[u8]) -> Result<Response, DimseError> {
    parse_command(bytes, false)
}

fn parse_command(bytes: &[u8], response: bool) -> Result<Response, DimseError> {
    let mut r = Response::default();
    let (mut field, mut status, mut dst) = (None, None, None);
    let mut pos = 0usize;
    while pos < bytes.len() {
        let head = bytes.get(pos..pos + 8).ok_or(DimseError::TruncatedHeader {
            what: "command set",
        })?;
        let group = u16::from_le_bytes([head[0], head[1]]);
        let elem = u16::from_le_bytes([head[2], head[3]]);
        let len = u32::from_le_bytes([head[4], head[5], head[6], head[7]]) as usize;
        pos += 8;
        let value = pos
            .checked_add(len)
            .and_then(|end| bytes.get(pos..end))
            .ok_or(DimseError::CommandOverrun { tag: (group, elem) })?;
        pos += len;
        if group != 0x0000 {
            // dcmtk-based peers (Orthanc) put the Failed SOP Instance UID
            // List (0008,0058) of a pending C-GET-RSP into its command set.
            continue;
        }
        match elem {
            0x0002 => r.affected_sop_class = uid_of(value),
            0x0100 => field = Some(u16_value(value)?),
            0x0110 => r.message_id = u16_value(value)?,
            0x0120 => r.responding_to = u16_value(value)?,
            0x0800 => dst = Some(u16_value(value)?),
            0x0900 => status = Some(u16_value(value)?),
            0x0902 => r.error_comment = Some(sanitise(value)).filter(|s| !s.is_empty()),
            0x1000 => r.affected_sop_instance = uid_of(value),
            0x1020 => r.sub_operations.remaining = Some(u16_value(value)?),
            0x1021 => r.sub_operations.completed = Some(u16_value(value)?),
            0x1022 => r.sub_operations.failed = Some(u16_value(value)?),
            0x1023 => r.sub_operations.warning = Some(u16_value(value)?),
            _ => {}
        }
    }
    r.command_field = field.ok_or(DimseError::Missing("Command Field"))?;
    r.status = match status {
        Some(s) => s,
        None if response => return Err(DimseError::Missing("Status")),
        None => 0,
    };
    r.has_data_set = dst.ok_or(DimseError::Missing("Command Data Set Type"))? != NO_DATA_SET;
    Ok(r)
}

/// What a status code means (PS3.4 Annex B.2.3, PS3.7 Annex C).
fn meaning(status: u16) -> &'static str {
    match status {
        0x0000 => "success",
        0x0001 => "requested optional attributes are not supported",
        0x0107 => "attribute list error",
        0x0110 => "processing failure",
        0x0111 => "duplicate SOP instance",
        0x0116 => "attribute value out of range",
        0x0117 => "invalid SOP instance",
        0x0118 => "no such SOP class",
        0x0119 => "class-instance conflict",
        0x0122 => "SOP class not supported",
        0x0124 => "refused: not authorized",
        0x0210 => "duplicate invocation",
        0x0211 => "unrecognized operation",
        0x0212 => "mistyped argument",
        0x0213 => "resource limitation",
        0xB000 => "coercion of data elements",
        0xB006 => "elements discarded",
        0xB007 => "data set does not match SOP class",
        0xFE00 => "cancelled",
        0xFF00 | 0xFF01 => "pending",
        0xA701 => "refused: out of resources, unable to calculate the number of matches",
        0xA702 => "refused: out of resources, unable to perform sub-operations",
        s if s & 0xFF00 == 0xA700 => "refused: out of resources",
        s if s & 0xFF00 == 0xA900 => "error: data set does not match SOP class",
        s if s & 0xF000 == 0xC000 => "error: cannot understand",
        s if s & 0xF000 == 0xB000 => "warning",
        _ => "unknown status",
    }
}

/// `C-STORE status 0xNNNN: meaning (comment)`.
pub(super) fn describe(service: &str, status: u16, comment: Option<&str>) -> String {
    let meaning = match status {
        // For the query/retrieve services 0xA900 is about the identifier.
        0xA900 if service != "C-STORE" => "error: identifier does not match SOP class",
        0xB000 if service == "C-GET" => "warning: sub-operations complete, some failed",
        _ => meaning(status),
    };
    let mut s = format!("{service} status 0x{status:04X}: {meaning}");
    if let Some(c) = comment {
        s.push_str(" (");
        s.push_str(c);
        s.push(')');
    }
    s
}

/// Whether a failure status may clear up on a later retry: out of resources.
pub(super) fn is_transient(status: u16) -> bool {
    status & 0xFF00 == 0xA700 || status == 0x0213
}

/// The outcome of one instance from its C-STORE-RSP status.
pub(super) fn store_outcome(status: u16, comment: Option<&str>) -> InstanceOutcome {
    match status {
        0x0000 => InstanceOutcome::Stored,
        // Warnings: stored, perhaps changed (PS3.4 B.2.3; 0001/0107/0116 from PS3.7 C.4).
        0x0001 | 0x0107 | 0x0116 | 0xB000..=0xBFFF => InstanceOutcome::Warning {
            reason: describe("C-STORE", status, comment),
        },
        _ => InstanceOutcome::Failed {
            transient: is_transient(status),
            reason: describe("C-STORE", status, comment),
        },
    }
}

const UNDEFINED: u32 = 0xFFFF_FFFF;
/// Sequence nesting accepted in a C-FIND identifier.
pub const MAX_IDENTIFIER_DEPTH: u32 = 16;

fn header_at(data: &[u8], pos: usize) -> Result<((u16, u16), u32), DimseError> {
    let h = data
        .get(pos..pos.saturating_add(8))
        .ok_or(DimseError::TruncatedHeader { what: "identifier" })?;
    Ok((
        (
            u16::from_le_bytes([h[0], h[1]]),
            u16::from_le_bytes([h[2], h[3]]),
        ),
        u32::from_le_bytes([h[4], h[5], h[6], h[7]]),
    ))
}

fn skip_defined(data: &[u8], pos: usize, len: u32) -> Result<usize, DimseError> {
    pos.checked_add(len as usize)
        .filter(|end| *end <= data.len())
        .ok_or(DimseError::IdentifierOverrun)
}

/// Skip the items of an undefined-length sequence; returns the position
/// after its delimiter.
fn skip_sequence(
    data: &[u8],
    mut pos: usize,
    depth: u32,
    max_depth: u32,
) -> Result<usize, DimseError> {
    if depth > max_depth {
        return Err(DimseError::TooDeep { limit: max_depth });
    }
    loop {
        let (tag, len) = header_at(data, pos)?;
        pos += 8;
        match tag {
            (0xFFFE, 0xE0DD) => return Ok(pos),
            (0xFFFE, 0xE000) if len == UNDEFINED => pos = skip_item(data, pos, depth, max_depth)?,
            (0xFFFE, 0xE000) => pos = skip_defined(data, pos, len)?,
            _ => return Err(DimseError::NonItem),
        }
    }
}

/// Skip the elements of an undefined-length item.
fn skip_item(data: &[u8], mut pos: usize, depth: u32, max_depth: u32) -> Result<usize, DimseError> {
    loop {
        let (tag, len) = header_at(data, pos)?;
        pos += 8;
        if tag == (0xFFFE, 0xE00D) {
            return Ok(pos);
        }
        pos = if len == UNDEFINED {
            skip_sequence(data, pos, depth + 1, max_depth)?
        } else {
            skip_defined(data, pos, len)?
        };
    }
}

/// The SOP Instance UID (0008,0018) of a C-FIND response identifier in
/// Implicit VR Little Endian, without padding; `None` if absent or empty.
/// Sequences are skipped up to [`MAX_IDENTIFIER_DEPTH`] deep.
pub(super) fn sop_instance_uid(data: &[u8]) -> Result<Option<String>, DimseError> {
    identifier_sop_instance_uid(data, MAX_IDENTIFIER_DEPTH)
}

/// The SOP Instance UID (0008,0018) of a C-FIND or C-GET identifier in
/// Implicit VR Little Endian, without padding; `None` if absent or empty.
/// Sequences (skipped, never parsed) may nest `max_depth` deep. Pure and
/// bounded: recursion is at most `max_depth` deep, the one string kept is
/// the UID's value.
///
/// # Errors
/// [`DimseError`] for a truncated or overrunning element, a non-item in a
/// sequence, or nesting deeper than `max_depth`.
pub fn identifier_sop_instance_uid(
    data: &[u8],
    max_depth: u32,
) -> Result<Option<String>, DimseError> {
    let mut pos = 0usize;
    while pos < data.len() {
        let (tag, len) = header_at(data, pos)?;
        pos += 8;
        if len == UNDEFINED {
            pos = skip_sequence(data, pos, 1, max_depth)?;
            continue;
        }
        let end = skip_defined(data, pos, len)?;
        if tag == (0x0008, 0x0018) {
            let v = String::from_utf8_lossy(&data[pos..end]);
            let v = v.trim_end_matches(['\0', ' ']).trim_start();
            return Ok(Some(v.to_owned()).filter(|s| !s.is_empty()));
        }
        pos = end;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn store_rq_has_group_length_and_even_uids() {
        let c = c_store_rq("1.2.840.10008.5.1.4.1.1.7", "1.2.3", 7);
        let len = u32::from_le_bytes(c[8..12].try_into().unwrap()) as usize;
        assert_eq!(len, c.len() - 12);
        assert!(c.len().is_multiple_of(2));
        // Round trip of the fields a response shares.
        let mut rsp = c.clone();
        rsp.extend_from_slice(&[0, 0, 0x00, 0x09, 2, 0, 0, 0, 0x00, 0xA7]);
        let r = parse_response(&rsp).unwrap();
        assert_eq!(r.command_field, C_STORE_RQ);
        assert_eq!(r.status, 0xA700);
        assert!(r.has_data_set);
    }

    #[test]
    fn statuses_map_to_outcomes() {
        assert_eq!(store_outcome(0, None), InstanceOutcome::Stored);
        assert!(matches!(
            store_outcome(0xB000, None),
            InstanceOutcome::Warning { .. }
        ));
        assert!(matches!(
            store_outcome(0xA702, None),
            InstanceOutcome::Failed {
                transient: true,
                ..
            }
        ));
        let InstanceOutcome::Failed { transient, reason } = store_outcome(0x0122, Some("no"))
        else {
            panic!()
        };
        assert!(!transient);
        assert_eq!(
            reason,
            "C-STORE status 0x0122: SOP class not supported (no)"
        );
        assert!(matches!(
            store_outcome(0xC123, None),
            InstanceOutcome::Failed {
                transient: false,
                ..
            }
        ));
    }

    #[test]
    fn identifier_uid_is_found_after_nested_sequences() {
        let mut d = Vec::new();
        element(&mut d, 0x0008, 0x0005, b"ISO_IR 100");
        // (0008,1115) undefined-length sequence, one undefined item holding
        // another undefined sequence with an empty defined item.
        d.extend_from_slice(&[0x08, 0, 0x15, 0x11, 0xFF, 0xFF, 0xFF, 0xFF]);
        d.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
        d.extend_from_slice(&[0x08, 0, 0x40, 0x11, 0xFF, 0xFF, 0xFF, 0xFF]);
        d.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0, 0, 0, 0]);
        d.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
        d.extend_from_slice(&[0xFE, 0xFF, 0x0D, 0xE0, 0, 0, 0, 0]);
        d.extend_from_slice(&[0xFE, 0xFF, 0xDD, 0xE0, 0, 0, 0, 0]);
        element(&mut d, 0x0008, 0x0018, &uid_value("1.2.345"));
        assert_eq!(sop_instance_uid(&d).unwrap().as_deref(), Some("1.2.345"));
        assert_eq!(
            sop_instance_uid(&image_level_query("1.2", "1.3")).unwrap(),
            None
        );
        assert!(sop_instance_uid(&d[..d.len() - 3]).is_err());
    }

    #[test]
    fn deep_nesting_is_refused() {
        let mut d = Vec::new();
        for _ in 0..40 {
            d.extend_from_slice(&[0x08, 0, 0x15, 0x11, 0xFF, 0xFF, 0xFF, 0xFF]);
            d.extend_from_slice(&[0xFE, 0xFF, 0x00, 0xE0, 0xFF, 0xFF, 0xFF, 0xFF]);
        }
        assert!(
            sop_instance_uid(&d)
                .unwrap_err()
                .to_string()
                .contains("deeper")
        );
    }

    #[test]
    fn c_get_messages_round_trip() {
        let rq = parse_request(&c_get_rq(9)).unwrap();
        assert_eq!(rq.command_field, C_GET_RQ);
        assert_eq!(rq.message_id, 9);
        assert_eq!(rq.affected_sop_class.as_deref(), Some(STUDY_ROOT_GET));
        assert!(rq.has_data_set);
        let rsp = parse_response(&c_store_rsp("1.2.3", "1.2.345", 7, 0xA700)).unwrap();
        assert_eq!(rsp.command_field, C_STORE_RSP);
        assert_eq!(rsp.responding_to, 7);
        assert_eq!(rsp.status, 0xA700);
        assert!(!rsp.has_data_set);
        assert_eq!(rsp.affected_sop_class.as_deref(), Some("1.2.3"));
        assert_eq!(rsp.affected_sop_instance.as_deref(), Some("1.2.345"));
        // A request has no Status.
        assert!(parse_response(&c_get_rq(1)).is_err());
        let keys = image_level_keys("1.2", "1.3", "1.2.345");
        assert_eq!(sop_instance_uid(&keys).unwrap().as_deref(), Some("1.2.345"));
    }

    /// A pending C-GET-RSP as Orthanc 1.10 sends it after a failed
    /// sub-operation: counts, and the Failed SOP Instance UID List in the
    /// command set itself.
    #[test]
    fn c_get_rsp_counts_and_a_stray_identifier_element() {
        let mut c = command(&[
            (0x0002, uid_value(STUDY_ROOT_GET)),
            (0x0100, C_GET_RSP.to_le_bytes().to_vec()),
            (0x0120, 1u16.to_le_bytes().to_vec()),
            (0x0800, NO_DATA_SET.to_le_bytes().to_vec()),
            (0x0900, 0xFF00u16.to_le_bytes().to_vec()),
            (0x1020, 0u16.to_le_bytes().to_vec()),
            (0x1021, 2u16.to_le_bytes().to_vec()),
            (0x1022, 1u16.to_le_bytes().to_vec()),
        ]);
        element(&mut c, 0x0008, 0x0000, &52u32.to_le_bytes());
        element(&mut c, 0x0008, 0x0058, &uid_value("1.2.345"));
        let r = parse_response(&c).unwrap();
        assert_eq!((r.command_field, r.status), (C_GET_RSP, 0xFF00));
        assert_eq!(
            r.sub_operations,
            SubOperations {
                remaining: Some(0),
                completed: Some(2),
                failed: Some(1),
                warning: None,
            }
        );
        assert_eq!(
            describe("C-GET", 0xA702, None),
            "C-GET status 0xA702: refused: out of resources, unable to perform sub-operations"
        );
        assert!(describe("C-GET", 0xA900, None).contains("identifier"));
    }

    #[test]
    fn pdata_header_is_consistent() {
        let mut b = vec![0u8; PDATA_HEADER + 10];
        set_pdata_header(&mut b, 3, false, true);
        assert_eq!(&b[..12], &[4, 0, 0, 0, 0, 16, 0, 0, 0, 12, 3, 2]);
    }
}
