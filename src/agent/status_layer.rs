//! How the agent gives a request body which does not decode (bytes that are not the RPC's protobuf message: a
//! truncated field, a wrong wire type, a string that is not UTF-8) the code the API promises for a malformed
//! request, INVALID_ARGUMENT. tonic's codec answers it with INTERNAL, which reads as a fault of the agent and would
//! be counted as one. Applied to every response by the agent's one tower layer ([`super::metrics_layer`]), so that
//! the metrics count the code the caller gets.

/// How tonic's prost codec begins the message of a request it cannot decode.
const DECODE_FAILURE: &str = "failed to decode Protobuf message";

/// Rewrites a trailers-only INTERNAL whose message is the codec's decode failure to INVALID_ARGUMENT. The message
/// is kept: it says what did not decode.
pub(crate) fn reclassify<B>(resp: &mut http::Response<B>) {
    let h = resp.headers();
    if h.get("grpc-status").is_none_or(|v| v.as_bytes() != b"13") {
        return;
    }
    // grpc-message is percent-encoded; the codec's words are plain ASCII, with spaces encoded or not.
    let decode = h.get("grpc-message").and_then(|v| v.to_str().ok()).is_some_and(|m| {
        m.starts_with(DECODE_FAILURE) || m.replace("%20", " ").starts_with(DECODE_FAILURE)
    });
    if decode {
        resp.headers_mut().insert("grpc-status", http::HeaderValue::from_static("3"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(status: &str, message: &str) -> http::Response<()> {
        let mut r = http::Response::new(());
        r.headers_mut().insert("grpc-status", http::HeaderValue::from_str(status).unwrap());
        r.headers_mut().insert("grpc-message", http::HeaderValue::from_str(message).unwrap());
        r
    }

    #[test]
    fn only_the_codecs_decode_failure_is_reclassified() {
        let plain = "failed to decode Protobuf message: invalid wire type";
        for m in [plain, "failed%20to%20decode%20Protobuf%20message: x"] {
            let mut r = resp("13", m);
            reclassify(&mut r);
            assert_eq!(r.headers()["grpc-status"], "3", "{m}");
        }
        let others = [("13", "backend returned no result"), ("14", "failed to decode Protobuf message"), ("0", "")];
        for (status, m) in others {
            let mut r = resp(status, m);
            reclassify(&mut r);
            assert_eq!(r.headers()["grpc-status"], status, "{status} {m}");
        }
    }
}
