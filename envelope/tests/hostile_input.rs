//! Property tests: whatever bytes arrive on a queue, the envelope decoders
//! answer `Ok` or an error, never a panic; and what is encoded decodes
//! back unchanged.

use std::borrow::Cow;

use funcatron_envelope::{Request, Response, RouteView, VERSION};
use proptest::prelude::*;

fn valid_request(path: &str, body: &str, headers: Vec<(String, String)>) -> Vec<u8> {
    Request {
        version: Cow::Borrowed(VERSION),
        id: Cow::Borrowed("id-1"),
        deadline_ms: 5,
        sent_ms: 1.5,
        method: Cow::Borrowed("POST"),
        scheme: Cow::Borrowed("http"),
        host: Cow::Borrowed("example.com"),
        path: Cow::Owned(path.to_owned()),
        query: Cow::Borrowed("a=1"),
        headers: headers
            .into_iter()
            .map(|(k, v)| (Cow::Owned(k), Cow::Owned(v)))
            .collect(),
        remote: None,
        body: Cow::Owned(body.to_owned()),
        body_base64: false,
        reply_to: Some(Cow::Borrowed("r")),
        reply_key: None,
        ..Request::default()
    }
    .encode()
}

fn decode_all(bytes: &[u8]) {
    let _ = Request::decode(bytes).map(|r| r.body_bytes().map(|b| b.len()));
    let _ = Response::decode(bytes).map(|r| r.body_bytes().map(|b| b.len()));
    let _ = RouteView::decode(bytes);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        decode_all(&bytes);
    }

    #[test]
    fn mutated_envelopes_never_panic(
        path in "/[a-z/{}%]{0,20}",
        body in ".{0,40}",
        cut in 0usize..400,
        flips in proptest::collection::vec((0usize..400, any::<u8>()), 0..8),
    ) {
        let mut bytes = valid_request(&path, &body, vec![("x-a".into(), "b".into())]);
        for (at, b) in flips {
            let n = bytes.len();
            bytes[at % n] = b;
        }
        bytes.truncate(cut.max(1).min(bytes.len()));
        decode_all(&bytes);
        // Base64 bodies with garbage.
        let text = String::from_utf8_lossy(&bytes).replace("\"body_base64\":false", "\"body_base64\":true");
        decode_all(text.as_bytes());
    }

    #[test]
    fn requests_round_trip(
        path in "/[ -~]{0,30}",
        body in "\\PC{0,60}",
        headers in proptest::collection::vec(("[a-z-]{1,10}", "[ -~]{0,20}"), 0..5),
    ) {
        let bytes = valid_request(&path, &body, headers.clone());
        let r = Request::decode(&bytes).unwrap();
        prop_assert_eq!(r.path.as_ref(), path.as_str());
        prop_assert_eq!(r.body.as_ref(), body.as_str());
        prop_assert_eq!(r.headers.len(), headers.len());
    }
}
