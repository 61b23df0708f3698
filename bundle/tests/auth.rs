//! Security schemes from the document, checked as the Runner checks them:
//! swagger-examples/security-openapi3.yaml and security-swagger2.yaml.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine;
use funcatron_bundle::auth::{AuthFailure, AuthInput, AuthRules, Guard, Principal};
use funcatron_control::state::SchemeCredentials;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

const OPENAPI3: &str = include_str!("../../swagger-examples/security-openapi3.yaml");
const SWAGGER2: &str = include_str!("../../swagger-examples/security-swagger2.yaml");
const HS_KEY: &str = "a-test-hs256-key-of-some-length";

fn doc(text: &str) -> Value {
    serde_yaml_ng::from_str(text).unwrap()
}

/// The secrets a Runner would read from its secrets directory.
fn secrets(name: &str) -> Result<String, String> {
    match name {
        "API_KEYS" => Ok("# accepted keys\nk-123\nk-456\n".into()),
        "USERS" => Ok("alice:wonderland\nbob:builder\n".into()),
        "HS" => Ok(HS_KEY.into()),
        "JWKS" => Ok(JWKS.with(|j| j.clone())),
        other => Err(format!("no secret {other}")),
    }
}

thread_local! {
    /// An ES256 key pair made for the test: (private PKCS#8 DER, JWKS of
    /// its public key).
    static EC: (Vec<u8>, String) = {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let pem = pair.serialize_der();
        let key = EncodingKey::from_ec_der(&pem);
        let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&key, Algorithm::ES256).unwrap();
        jwk.common.key_id = Some("ec-1".into());
        let set = json!({"keys": [serde_json::to_value(&jwk).unwrap()]});
        (pem, set.to_string())
    };
    static JWKS: String = EC.with(|e| e.1.clone());
}

fn creds(secret: Option<&str>) -> SchemeCredentials {
    SchemeCredentials {
        secret: secret.map(str::to_owned),
        ..SchemeCredentials::default()
    }
}

fn guard(text: &str, audience: Option<&str>) -> Guard {
    let rules = AuthRules::compile(&doc(text), Path::new("t.yaml")).unwrap();
    let mut c = BTreeMap::new();
    c.insert("key".to_owned(), creds(Some("API_KEYS")));
    c.insert("qkey".to_owned(), creds(Some("API_KEYS")));
    c.insert("ckey".to_owned(), creds(Some("API_KEYS")));
    c.insert("aliased".to_owned(), creds(Some("API_KEYS")));
    c.insert("basic".to_owned(), creds(Some("USERS")));
    c.insert(
        "bearer".to_owned(),
        SchemeCredentials {
            secret: Some("HS".into()),
            audience: audience.map(str::to_owned),
            issuer: Some("https://issuer.example".into()),
            ..SchemeCredentials::default()
        },
    );
    c.insert(
        "oauth".to_owned(),
        SchemeCredentials {
            jwks_secret: Some("JWKS".into()),
            ..SchemeCredentials::default()
        },
    );
    // `mtls` is left unconfigured on purpose (and cannot be checked).
    Guard::new(rules, &c, &secrets).unwrap()
}

fn check(
    g: &Guard,
    route: &str,
    headers: &[(&str, &str)],
    query: &str,
) -> Result<Option<Principal>, AuthFailure> {
    g.check(route, &AuthInput { headers, query })
}

fn basic(user: &str, pass: &str) -> String {
    let b = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    format!("Basic {b}")
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

fn hs_token(claims: Value) -> String {
    let key = EncodingKey::from_secret(HS_KEY.as_bytes()).unwrap();
    format!(
        "Bearer {}",
        encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap()
    )
}

fn es_token(claims: Value) -> String {
    let der = EC.with(|e| e.0.clone());
    let key = EncodingKey::from_ec_der(&der);
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some("ec-1".into());
    format!("Bearer {}", encode(&h, &claims, &key).unwrap())
}

#[test]
fn open_operations_and_opt_outs_need_nothing_and_the_global_requirement_applies() {
    let g = guard(OPENAPI3, None);
    assert_eq!(check(&g, "GET /open", &[], ""), Ok(None));
    assert_eq!(
        check(&g, "GET /maybe", &[], ""),
        Ok(None),
        "`{{}}` admits anyone"
    );
    let e = check(&g, "GET /global", &[], "").unwrap_err();
    assert_eq!(e.status, 401);
    assert_eq!(e.www_authenticate, "Bearer realm=\"funcatron\"");
    assert!(e.reason.contains("no Bearer token"), "{}", e.reason);
}

#[test]
fn api_keys_are_checked_in_header_query_and_cookie() {
    let g = guard(OPENAPI3, None);
    let ok = check(&g, "GET /either", &[("x-api-key", "k-456")], "")
        .unwrap()
        .unwrap();
    assert_eq!(ok.scheme, "key");
    let e = check(&g, "GET /either", &[("x-api-key", "k-999")], "").unwrap_err();
    assert_eq!(e.status, 401);
    assert!(
        !e.reason.contains("k-999"),
        "a refusal never echoes the credential"
    );
    assert!(check(&g, "GET /query", &[], "a=1&api_key=k-123").is_ok());
    assert!(check(&g, "GET /query", &[], "api_key=nope").is_err());
    assert!(check(
        &g,
        "GET /cookie",
        &[("cookie", "theme=dark; session=k-123")],
        ""
    )
    .is_ok());
    assert!(check(&g, "GET /cookie", &[("cookie", "session=k-1234")], "").is_err());
    let e = check(&g, "GET /query", &[("x-api-key", "k-123")], "").unwrap_err();
    assert!(
        e.www_authenticate.contains("name=\"api_key\""),
        "{}",
        e.www_authenticate
    );
}

#[test]
fn basic_credentials_name_the_user_and_alternatives_and_conjunctions_hold() {
    let g = guard(OPENAPI3, None);
    let alice = basic("alice", "wonderland");
    let p = check(&g, "GET /either", &[("authorization", &alice)], "")
        .unwrap()
        .unwrap();
    assert_eq!(
        (p.scheme.as_str(), p.subject.as_deref()),
        ("basic", Some("alice"))
    );
    let wrong = basic("alice", "wonderlan");
    let e = check(&g, "GET /either", &[("authorization", &wrong)], "").unwrap_err();
    assert_eq!(e.status, 401);
    assert_eq!(
        e.www_authenticate,
        "ApiKey realm=\"funcatron\", name=\"x-api-key\", Basic realm=\"funcatron\""
    );
    // `both` needs the key AND the password.
    assert!(check(&g, "GET /both", &[("authorization", &alice)], "").is_err());
    assert!(check(&g, "GET /both", &[("x-api-key", "k-123")], "").is_err());
    let both = [("authorization", alice.as_str()), ("x-api-key", "k-123")];
    assert!(check(&g, "GET /both", &both, "").is_ok());
}

#[test]
fn bearer_jwts_are_verified_for_signature_expiry_audience_and_issuer() {
    let g = guard(OPENAPI3, Some("pets-api"));
    let good = json!({"sub": "u-1", "exp": now() + 600, "aud": "pets-api",
                      "iss": "https://issuer.example", "role": "admin"});
    let t = hs_token(good.clone());
    let p = check(&g, "GET /global", &[("authorization", &t)], "")
        .unwrap()
        .unwrap();
    assert_eq!(p.subject.as_deref(), Some("u-1"));
    assert_eq!(
        p.claims.unwrap()["role"],
        "admin",
        "the verified claims reach the Func"
    );

    let mut expired = good.clone();
    expired["exp"] = json!(now() - 3600);
    let mut other_aud = good.clone();
    other_aud["aud"] = json!("another-api");
    let mut other_iss = good.clone();
    other_iss["iss"] = json!("https://evil.example");
    let mut no_exp = good.clone();
    no_exp.as_object_mut().unwrap().remove("exp");
    for (what, claims) in [
        ("expired", expired),
        ("audience", other_aud),
        ("issuer", other_iss),
        ("no exp", no_exp),
    ] {
        let t = hs_token(claims);
        let e = check(&g, "GET /global", &[("authorization", &t)], "").unwrap_err();
        assert_eq!(e.status, 401, "{what}: {}", e.reason);
    }
    // Signed with another key, or not signed at all.
    let forged = {
        let key = EncodingKey::from_secret(b"not the key").unwrap();
        format!(
            "Bearer {}",
            encode(&Header::new(Algorithm::HS256), &good, &key).unwrap()
        )
    };
    assert!(check(&g, "GET /global", &[("authorization", &forged)], "").is_err());
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let unsigned = format!("Bearer {}.{}.", b64(&json!({"alg": "none"})), b64(&good));
    assert!(check(&g, "GET /global", &[("authorization", &unsigned)], "").is_err());
    assert!(check(&g, "GET /global", &[("authorization", "Bearer ")], "").is_err());
}

#[test]
fn jwks_keys_verify_by_kid_and_scopes_are_required() {
    let g = guard(OPENAPI3, None);
    let scoped =
        es_token(json!({"sub": "svc", "exp": now() + 600, "scope": "pets:read pets:write"}));
    let p = check(&g, "POST /scoped", &[("authorization", &scoped)], "")
        .unwrap()
        .unwrap();
    assert_eq!(p.scheme, "oauth");
    let unscoped = es_token(json!({"sub": "svc", "exp": now() + 600, "scp": ["pets:read"]}));
    let e = check(&g, "POST /scoped", &[("authorization", &unscoped)], "").unwrap_err();
    assert_eq!(e.status, 403, "{}", e.reason);
    assert!(e.reason.contains("pets:write"), "{}", e.reason);
    // An HS256 token is no good for the JWKS scheme.
    let hs = hs_token(json!({"sub": "svc", "exp": now() + 600, "scope": "pets:write"}));
    assert_eq!(
        check(&g, "POST /scoped", &[("authorization", &hs)], "")
            .unwrap_err()
            .status,
        401
    );
}

#[test]
fn unconfigured_and_uncheckable_schemes_refuse_everything() {
    let g = guard(OPENAPI3, None);
    let e = check(&g, "GET /mtls", &[("x-api-key", "k-123")], "").unwrap_err();
    assert_eq!(e.status, 401);
    assert!(e.reason.contains("cannot check"), "{}", e.reason);
    // Nothing configured at all: the bundle as uploaded, before the
    // operator's settings.
    let rules = AuthRules::compile(&doc(OPENAPI3), Path::new("t.yaml")).unwrap();
    let bare = Guard::new(rules, &BTreeMap::new(), &secrets).unwrap();
    let e = check(&bare, "GET /either", &[("x-api-key", "k-123")], "").unwrap_err();
    assert!(
        e.reason.contains("no credentials are configured"),
        "{}",
        e.reason
    );
    assert_eq!(check(&bare, "GET /open", &[], ""), Ok(None));
}

#[test]
fn a_configured_secret_that_is_missing_or_malformed_is_an_error() {
    let rules = AuthRules::compile(&doc(OPENAPI3), Path::new("t.yaml")).unwrap();
    let mut c = BTreeMap::new();
    c.insert("key".to_owned(), creds(Some("NOPE")));
    assert!(Guard::new(rules.clone(), &c, &secrets)
        .unwrap_err()
        .contains("NOPE"));
    let mut c = BTreeMap::new();
    c.insert(
        "oauth".to_owned(),
        SchemeCredentials {
            jwks_secret: Some("USERS".into()),
            ..SchemeCredentials::default()
        },
    );
    assert!(Guard::new(rules, &c, &secrets)
        .unwrap_err()
        .contains("not a JWKS"));
}

#[test]
fn a_requirement_naming_an_undefined_scheme_is_refused_with_its_pointer() {
    let text = OPENAPI3.replace("security: [{qkey: []}]", "security: [{nope: []}]");
    let e = AuthRules::compile(&doc(&text), Path::new("t.yaml"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("/paths/~1query/get/security/0"), "{e}");
    assert!(e.contains("`nope`"), "{e}");
}

#[test]
fn swagger2_security_definitions_are_enforced() {
    let g = guard(SWAGGER2, None);
    let alice = basic("bob", "builder");
    assert!(check(&g, "GET /pets", &[("authorization", &alice)], "").is_ok());
    assert!(check(&g, "GET /pets", &[], "").is_err());
    assert!(check(&g, "POST /pets", &[("authorization", &alice)], "").is_err());
    assert!(check(&g, "POST /pets", &[("x-api-key", "k-123")], "").is_ok());
}
