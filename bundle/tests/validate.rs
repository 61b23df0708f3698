//! Request validation against the real Petstore documents (Swagger 2.0 and
//! OpenAPI 3.0).

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::Path;

use funcatron_bundle::validate::{compile_bundle, Checks, Input};
use funcatron_bundle::Bundle;

fn petstore(file: &str, validate: bool) -> (tempfile::TempDir, HashMap<String, Checks>) {
    let dir = tempfile::tempdir().unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../swagger-examples")
        .join(file);
    let name = if file.contains("swagger2") {
        "swagger.yaml"
    } else {
        "openapi.yaml"
    };
    std::fs::copy(src, dir.path().join(name)).unwrap();
    std::fs::write(
        dir.path().join("funcatron.yaml"),
        format!("name: petstore\nruntime: lua\nvalidate: {validate}\n"),
    )
    .unwrap();
    std::fs::write(dir.path().join("main.lua"), "return {}").unwrap();
    let b = Bundle::load(dir.path()).unwrap();
    let checks = compile_bundle(&b).unwrap();
    (dir, checks)
}

fn check(
    checks: &HashMap<String, Checks>,
    op: &str,
    params: &[(&str, &str)],
    query: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Vec<String> {
    let params: Vec<(String, String)> = params
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    checks[op].check(&Input {
        params: &params,
        query,
        headers,
        body: body.as_bytes(),
    })
}

#[test]
fn swagger2_parameters_and_bodies_are_checked() {
    let (_d, c) = petstore("petstore-swagger2.yaml", true);
    let json = [("content-type", "application/json")];
    assert!(check(&c, "getPetById", &[("petId", "12")], "", &[], "").is_empty());
    let p = check(&c, "getPetById", &[("petId", "twelve")], "", &[], "");
    assert_eq!(p.len(), 1);
    assert!(
        p[0].contains("path parameter `petId`") && p[0].contains("not an integer"),
        "{p:?}"
    );
    // Arrays one value per occurrence (collectionFormat multi), items by enum.
    assert!(check(
        &c,
        "findPetsByStatus",
        &[],
        "status=available&status=sold",
        &[],
        ""
    )
    .is_empty());
    let p = check(
        &c,
        "findPetsByStatus",
        &[],
        "status=available&status=lost",
        &[],
        "",
    );
    assert!(p.len() == 1 && p[0].contains("lost"), "{p:?}");
    let p = check(&c, "findPetsByStatus", &[], "", &[], "");
    assert!(
        p.len() == 1 && p[0].contains("required but missing"),
        "{p:?}"
    );
    // Body against a $ref'd definition.
    let ok = r#"{"name": "rex", "photoUrls": ["a"], "status": "sold"}"#;
    assert!(check(&c, "addPet", &[], "", &json, ok).is_empty());
    let p = check(
        &c,
        "addPet",
        &[],
        "",
        &json,
        r#"{"name": 3, "status": "lost"}"#,
    );
    let all = p.join("\n");
    assert!(
        all.contains("photoUrls") && all.contains("/name") && all.contains("/status"),
        "{all}"
    );
    let p = check(&c, "addPet", &[], "", &json, "");
    assert!(p[0].contains("required but empty"), "{p:?}");
    let p = check(&c, "addPet", &[], "", &json, "{oops");
    assert!(p[0].contains("not valid JSON"), "{p:?}");
    // A non-JSON body (the operation also consumes XML) is not checked here.
    assert!(check(
        &c,
        "addPet",
        &[],
        "",
        &[("content-type", "application/xml")],
        "<pet/>"
    )
    .is_empty());
    // Headers by case-insensitive name, optional ones may be absent.
    assert!(check(
        &c,
        "deletePet",
        &[("petId", "1")],
        "",
        &[("API_KEY", "k")],
        ""
    )
    .is_empty());
    assert!(check(&c, "deletePet", &[("petId", "1")], "", &[], "").is_empty());
}

#[test]
fn openapi3_parameters_and_request_bodies_are_checked() {
    let (_d, c) = petstore("petstore-openapi3.yaml", true);
    let json = [("content-type", "application/json")];
    assert!(check(&c, "findPetsByStatus", &[], "status=pending", &[], "").is_empty());
    let p = check(&c, "findPetsByStatus", &[], "status=gone", &[], "");
    assert!(
        p.len() == 1 && p[0].contains("query parameter `status`"),
        "{p:?}"
    );
    assert!(check(&c, "findPetsByTags", &[], "tags=a&tags=b", &[], "").is_empty());
    let p = check(&c, "addPet", &[], "", &json, r#"{"id": "x"}"#);
    assert!(p.join(" ").contains("name"), "{p:?}");
    // The only content type is JSON: anything else is named as refused.
    let p = check(
        &c,
        "addPet",
        &[],
        "",
        &[("content-type", "text/plain")],
        "rex",
    );
    assert!(p[0].contains("not accepted"), "{p:?}");
}

#[test]
fn validate_false_compiles_no_checks() {
    let (_d, c) = petstore("petstore-swagger2.yaml", false);
    assert!(c.is_empty());
}
