//! The tus request headers: whatever the bytes, no panic; a value parsed
//! as a number prints back as its digits; `Upload-Metadata` that parses
//! encodes back to pairs that parse the same.
#![no_main]
use libfuzzer_sys::fuzz_target;
use relaypacs_http::tus_headers::{
    MetadataError, MetadataLimits, TusHeaderError, check_version, encode_metadata, metadata_pairs,
    parse_checksum, parse_metadata, parse_u64, single_value,
};

fuzz_target!(|data: &[u8]| {
    // The values a request gave one header, one per line.
    let values: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
    let Ok(Some(text)) = single_value("upload-metadata", values.iter().copied()) else {
        // Not one visible-ASCII value: the lossy text still must not panic.
        let lossy = String::from_utf8_lossy(data);
        let _ = parse_metadata(&lossy, &MetadataLimits::default());
        let _ = parse_checksum(&lossy);
        let _ = parse_u64("upload-offset", &lossy);
        return;
    };
    assert!(values.len() == 1);
    if let Ok(n) = parse_u64("upload-length", text) {
        let digits = text.trim_start_matches('0');
        assert_eq!(n.to_string(), if digits.is_empty() { "0" } else { digits });
    }
    let _ = check_version(Some(text));
    let _ = parse_checksum(text);
    let limits = MetadataLimits {
        max_key_len: 64,
        max_pairs: 32,
    };
    let meta = parse_metadata(text, &limits);
    let pairs: Result<Vec<(&str, Vec<u8>)>, _> = metadata_pairs(text, &limits).collect();
    // The typed parse fails only where the pairs do, or on a text key
    // that is not UTF-8.
    match (&meta, &pairs) {
        (Ok(_), Err(e)) => panic!("metadata parsed, its pairs did not: {e}"),
        (Err(e), Ok(_)) => assert!(
            matches!(e, TusHeaderError::Metadata(MetadataError::NotUtf8 { .. })),
            "{e}"
        ),
        _ => {}
    }
    if let Ok(pairs) = pairs {
        let again = encode_metadata(pairs.iter().map(|(k, v)| (*k, v.as_slice())));
        let back: Vec<(&str, Vec<u8>)> = metadata_pairs(&again, &limits)
            .collect::<Result<_, _>>()
            .unwrap_or_else(|e| panic!("{again:?} does not parse back: {e}"));
        assert_eq!(pairs, back);
        assert_eq!(meta.ok(), parse_metadata(&again, &limits).ok());
    }
});
