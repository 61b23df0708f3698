//! Chains at the Runner: after a stage's Func has answered, send the
//! answer on as the next stage's request, or reply to the caller.
//!
//! Router (resolves every stage: `funcatron_routes::chain`) -> stage 0's
//! Func queue -> **Runner: this module** -> stage 1's Func queue -> ... ->
//! the last stage's Runner replies to the ingress. A stage that answers
//! 2xx passes its body and `Content-Type` to the next stage's request
//! (method, host, path and query of that stage; every other request header
//! as the caller sent it, so the same credentials reach every stage, whose
//! Runner checks them as for a direct call). The first stage that answers
//! anything else ends the chain: the caller gets that stage's status and a
//! JSON error naming the stage, its index and its answer. The last stage's
//! answer reaches the caller with a `Server-Timing` entry per stage.
//!
//! The serve loop publishes what [`next`] returns and acknowledges the
//! delivery only once it is out, as for any reply: a Runner that dies
//! between the two leaves the stage to run again, never the chain lost.

use std::borrow::Cow;

use funcatron_broker::Message;
use funcatron_control::headers;
use funcatron_envelope::{now_ms, Request, Response};

/// Most bytes of a failing stage's answer body quoted in the chain's
/// error.
const QUOTED_BODY: usize = 4 * 1024;

/// What to do with a stage's answer.
#[derive(Debug)]
pub(crate) enum Next {
    /// Publish this response to the request's `reply_to`.
    Reply(Vec<u8>),
    /// Publish this request to the next stage's queue.
    Forward {
        /// The next stage's Func queue.
        queue: String,
        /// The next stage's request, with its routing headers.
        message: Message,
    },
    /// The chain's deadline has passed (the ingress answered 504): stop.
    Expired,
    /// Publish this request again after `delay_ms` (a step of an
    /// asynchronous flow its Func's policy retries), held by the broker.
    Retry {
        /// Where it goes once the delay is over.
        queue: String,
        /// The next attempt.
        message: Message,
        /// How long the broker holds it.
        delay_ms: u64,
    },
}

/// What follows stage `request.chain.at`'s answer `response` (both
/// encoded). `Err`: the envelopes do not decode (dead-letter).
pub(crate) fn next(request: &[u8], response: &[u8]) -> Result<Next, String> {
    let mut req = Request::decode(request).map_err(|e| e.to_string())?;
    let mut resp = Response::decode(response).map_err(|e| e.to_string())?;
    let Some(mut chain) = req.chain.take() else {
        return Ok(Next::Reply(response.to_vec()));
    };
    let at = chain.at as usize;
    let Some(stage) = chain.stages.get(at) else {
        return Err(format!("chain stage {at} of {} stages", chain.stages.len()));
    };
    chain.exec_ms.push(resp.timings.exec_ms);
    if !(200..300).contains(&resp.status) {
        tracing::info!(request_id = %req.id, func = %stage.func, stage = at, status = resp.status, "chain stage failed");
        return Ok(Next::Reply(failed(&req, &resp, at, &stage.func)));
    }
    let Some(following) = chain.stages.get(at + 1) else {
        resp.headers.push((
            Cow::Borrowed("server-timing"),
            Cow::Owned(server_timing(&chain.stages, &chain.exec_ms)),
        ));
        return Ok(Next::Reply(resp.encode()));
    };
    let left_ms = req.deadline_ms as f64 - now_ms();
    if left_ms <= 0.0 {
        return Ok(Next::Expired);
    }
    let mut message_headers: Vec<(String, String)> = following
        .headers
        .iter()
        .map(|(k, v)| {
            let v = if k == headers::DISPATCHED_MS {
                format!("{:.3}", now_ms())
            } else {
                v.to_string()
            };
            (k.to_string(), v)
        })
        .collect();
    message_headers.push((headers::CHAIN.to_owned(), "1".to_owned()));
    let queue = following.queue.to_string();
    let (method, host, path, query) = (
        following.method.clone(),
        following.host.clone(),
        following.path.clone(),
        following.query.clone(),
    );
    let content_type = resp
        .headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        .map(|(_, v)| Cow::Owned(v.to_string()));
    req.headers
        .retain(|(k, _)| !matches!(&**k, "content-type" | "content-length" | "host"));
    req.headers.push((Cow::Borrowed("host"), host.clone()));
    if let Some(ct) = content_type {
        req.headers.push((Cow::Borrowed("content-type"), ct));
    }
    chain.at += 1;
    let next = Request {
        method,
        host,
        path,
        query,
        body: std::mem::take(&mut resp.body),
        body_base64: resp.body_base64,
        chain: Some(chain),
        ..req
    };
    Ok(Next::Forward {
        queue,
        message: Message {
            payload: next.encode().into(),
            headers: message_headers,
            ttl_ms: Some(left_ms.ceil() as u64),
            persistent: false,
        },
    })
}

/// The chain's answer when stage `at` (Func `func`) answered `resp`,
/// not 2xx: its status, and a JSON error naming the stage with the
/// stage's answer quoted.
fn failed(req: &Request<'_>, resp: &Response<'_>, at: usize, func: &str) -> Vec<u8> {
    let body = resp.body_bytes().unwrap_or_default();
    let text = String::from_utf8_lossy(&body[..body.len().min(QUOTED_BODY)]).into_owned();
    let answer =
        serde_json::from_str::<serde_json::Value>(&text).unwrap_or(serde_json::Value::String(text));
    let message = format!("stage {at} ({func}) answered {}", resp.status);
    let body = serde_json::json!({
        "error": "chain_stage_failed",
        "message": message,
        "request_id": req.id,
        "stage": at,
        "func": func,
        "answer": { "status": resp.status, "body": answer },
    });
    Response {
        version: Cow::Borrowed(funcatron_envelope::VERSION),
        id: req.id.clone(),
        status: resp.status,
        headers: vec![(
            Cow::Borrowed("content-type"),
            Cow::Borrowed("application/json"),
        )],
        body: Cow::Owned(body.to_string()),
        body_base64: false,
        timings: resp.timings,
        reply_key: req.reply_key.clone(),
        ..Default::default()
    }
    .encode()
}

/// `Server-Timing` with one entry per stage: `stage0;desc="sed";dur=1.2`.
fn server_timing(stages: &[funcatron_envelope::ChainStage<'_>], exec_ms: &[f64]) -> String {
    stages
        .iter()
        .zip(exec_ms)
        .enumerate()
        .map(|(i, (s, ms))| format!("stage{i};desc=\"{}\";dur={ms:.3}", s.func))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use funcatron_envelope::{Chain, ChainStage, Timings};

    use super::*;

    fn stage(func: &str) -> ChainStage<'static> {
        ChainStage {
            func: Cow::Owned(func.into()),
            queue: Cow::Owned(format!("funcatron.func.{func}")),
            method: Cow::Borrowed("POST"),
            host: Cow::Borrowed("h"),
            path: Cow::Owned(format!("/{func}/")),
            query: Cow::Borrowed("e=1"),
            headers: vec![
                (
                    Cow::Borrowed(headers::OPERATION),
                    Cow::Owned(format!("{func}_op")),
                ),
                (
                    Cow::Borrowed(headers::DISPATCHED_MS),
                    Cow::Borrowed("1.000"),
                ),
            ],
        }
    }

    fn request(at: u32) -> Vec<u8> {
        Request {
            version: Cow::Borrowed(funcatron_envelope::VERSION),
            id: Cow::Borrowed("r1"),
            deadline_ms: (now_ms() + 30_000.0) as u64,
            method: Cow::Borrowed("POST"),
            path: Cow::Borrowed("/a/"),
            headers: vec![
                (Cow::Borrowed("authorization"), Cow::Borrowed("Bearer t")),
                (Cow::Borrowed("content-type"), Cow::Borrowed("text/plain")),
            ],
            body: Cow::Borrowed("in"),
            reply_to: Some(Cow::Borrowed("replies")),
            reply_key: Some(Cow::Borrowed("k")),
            chain: Some(Chain {
                at,
                stages: vec![stage("a"), stage("b")],
                exec_ms: if at == 1 { vec![1.5] } else { vec![] },
            }),
            ..Default::default()
        }
        .encode()
    }

    fn answer(status: u16, body: &str) -> Vec<u8> {
        Response {
            version: Cow::Borrowed(funcatron_envelope::VERSION),
            id: Cow::Borrowed("r1"),
            status,
            headers: vec![(Cow::Borrowed("content-type"), Cow::Borrowed("text/x-up"))],
            body: Cow::Owned(body.into()),
            timings: Timings {
                exec_ms: 2.0,
                ..Default::default()
            },
            reply_key: Some(Cow::Borrowed("k")),
            ..Default::default()
        }
        .encode()
    }

    #[test]
    fn a_2xx_answer_becomes_the_next_stages_request() {
        let Next::Forward { queue, message } = next(&request(0), &answer(200, "OUT")).unwrap()
        else {
            panic!("not forwarded");
        };
        assert_eq!(queue, "funcatron.func.b");
        assert!(message
            .headers
            .iter()
            .any(|(k, v)| k == headers::OPERATION && v == "b_op"));
        assert!(message.headers.iter().any(|(k, _)| k == headers::CHAIN));
        let fresh = message
            .headers
            .iter()
            .find(|(k, _)| k == headers::DISPATCHED_MS)
            .map(|(_, v)| v.parse::<f64>().unwrap())
            .unwrap();
        assert!(fresh > 1.0);
        let r = Request::decode(&message.payload).unwrap();
        assert_eq!((&*r.path, &*r.query, &*r.body), ("/b/", "e=1", "OUT"));
        assert_eq!(r.reply_to.as_deref(), Some("replies"));
        assert_eq!(r.reply_key.as_deref(), Some("k"));
        let chain = r.chain.unwrap();
        assert_eq!((chain.at, chain.exec_ms), (1, vec![2.0]));
        let h = |n: &str| {
            r.headers
                .iter()
                .filter(|(k, _)| k == n)
                .map(|(_, v)| v.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(h("content-type"), vec!["text/x-up"]);
        assert_eq!(h("authorization"), vec!["Bearer t"]);
    }

    #[test]
    fn the_last_stage_replies_with_a_timing_per_stage() {
        let Next::Reply(bytes) = next(&request(1), &answer(200, "END")).unwrap() else {
            panic!("not a reply");
        };
        let r = Response::decode(&bytes).unwrap();
        assert_eq!((r.status, &*r.body), (200, "END"));
        let timing = r
            .headers
            .iter()
            .find(|(k, _)| k == "server-timing")
            .map(|(_, v)| v.to_string())
            .unwrap();
        assert_eq!(
            timing,
            "stage0;desc=\"a\";dur=1.500, stage1;desc=\"b\";dur=2.000"
        );
    }

    #[test]
    fn a_failing_stage_ends_the_chain_naming_itself() {
        let Next::Reply(bytes) = next(&request(0), &answer(422, r#"{"why":"no"}"#)).unwrap() else {
            panic!("not a reply");
        };
        let r = Response::decode(&bytes).unwrap();
        assert_eq!(r.status, 422);
        assert_eq!(r.reply_key.as_deref(), Some("k"));
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["error"], "chain_stage_failed");
        assert_eq!(
            (v["stage"].as_u64(), v["func"].as_str()),
            (Some(0), Some("a"))
        );
        assert_eq!(v["answer"]["body"]["why"], "no");
    }
}
