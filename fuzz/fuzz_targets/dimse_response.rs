//! DIMSE command sets and identifiers from a peer: whatever the bytes, no
//! panic, bounded text, and the nesting limit holds.
#![no_main]
use libfuzzer_sys::fuzz_target;
use relaypacs_pacs::parse::dimse::{
    DimseError, MAX_IDENTIFIER_DEPTH, identifier_sop_instance_uid, parse_request, parse_response,
};

fuzz_target!(|data: &[u8]| {
    let rsp = parse_response(data);
    let rq = parse_request(data);
    // A response needs everything a request does, and a Status.
    if let Ok(r) = &rsp {
        let q = rq.as_ref().expect("a response parses as a request");
        assert_eq!(r.command_field, q.command_field);
    }
    for r in [rsp, rq].into_iter().flatten() {
        for s in [
            &r.error_comment,
            &r.affected_sop_class,
            &r.affected_sop_instance,
        ]
        .into_iter()
        .flatten()
        {
            assert!(
                !s.is_empty() && s.len() <= 256 && s.bytes().all(|b| (0x20..0x7F).contains(&b))
            );
        }
    }
    let _ = identifier_sop_instance_uid(data, MAX_IDENTIFIER_DEPTH);
    match identifier_sop_instance_uid(data, 1) {
        Err(DimseError::TooDeep { limit }) => assert_eq!(limit, 1),
        _ => {}
    }
});
