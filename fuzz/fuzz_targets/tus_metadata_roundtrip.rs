//! `Upload-Metadata` round trip: any pairs with keys tus allows (visible
//! ASCII without a comma, 1-64 bytes, each once), encoded then parsed,
//! are the same pairs in the same order.
#![no_main]
use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;
use relaypacs_http::tus_headers::{MetadataLimits, encode_metadata, metadata_pairs};

fuzz_target!(|pairs: Vec<(String, Vec<u8>)>| {
    let mut seen = HashSet::new();
    let pairs: Vec<(String, Vec<u8>)> = pairs
        .into_iter()
        .map(|(k, v)| {
            let key: String = k
                .chars()
                .filter(|c| c.is_ascii_graphic() && *c != ',')
                .take(64)
                .collect();
            (key, v)
        })
        .filter(|(k, _)| !k.is_empty() && seen.insert(k.clone()))
        .collect();
    let header = encode_metadata(pairs.iter().map(|(k, v)| (k.as_str(), v.as_slice())));
    let limits = MetadataLimits {
        max_key_len: 64,
        max_pairs: pairs.len(),
    };
    let back: Vec<(&str, Vec<u8>)> = metadata_pairs(&header, &limits)
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("{header:?}: {e}"));
    assert_eq!(back.len(), pairs.len());
    for ((k, v), (k2, v2)) in pairs.iter().zip(&back) {
        assert_eq!((k.as_str(), v), (*k2, v2));
    }
});
