//! The DICOM JSON a PACS answers: the STOW-RS Store Instances Response and
//! QIDO-RS results. Whatever the bytes, no panic; the limits hold.
#![no_main]
use libfuzzer_sys::fuzz_target;
use relaypacs_pacs::parse::dicom_json::{
    DicomJsonError, DicomJsonLimits, items_of, number_of, parse_qido_answer, parse_store_response,
    string_of,
};

const TAGS: [&str; 8] = [
    "00080018", "0020000D", "0020000E", "00081198", "00081199", "00081155", "00081197", "00081196",
];

fuzz_target!(|data: &[u8]| {
    let limits = DicomJsonLimits {
        max_bytes: 1 << 16,
        max_objects: 64,
    };
    if let Ok(r) = parse_store_response(data, &limits) {
        assert!(
            r.referenced
                .keys()
                .chain(r.failed.keys())
                .all(|k| k.len() <= data.len())
        );
    }
    match parse_qido_answer(data, &limits) {
        Ok(objects) => {
            assert!(objects.len() <= limits.max_objects);
            for o in &objects {
                for t in TAGS {
                    let _ = string_of(o, t);
                    let _ = number_of(o, t);
                    for item in items_of(o, t) {
                        let _ = string_of(item, "00081155");
                    }
                }
            }
        }
        Err(DicomJsonError::TooLarge { limit }) => assert!(data.len() > limit),
        Err(_) => {}
    }
});
