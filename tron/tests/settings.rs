//! Enable-time settings are checked like the bundle fields they override:
//! an `env` key or secret name that is not a variable name is refused
//! (a secret name names a file under each Runner's secrets directory, so
//! `../..` in one would read any file), and nothing changes.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;

use funcatron_control::state::FuncSettings;

#[tokio::test]
async fn settings_with_unusable_names_are_refused() {
    let store = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    std::fs::write(
        src.path().join("swagger.yaml"),
        "swagger: '2.0'\nbasePath: /s\nx-funcatron: {name: s, runtime: lua}\npaths:\n  /:\n    get: {operationId: hi}\n",
    )
    .unwrap();
    std::fs::write(
        src.path().join("main.lua"),
        "return { hi = function() return 'hi' end }",
    )
    .unwrap();
    let (_, archive) = funcatron_bundle::archive::build(src.path()).unwrap();
    let registry = common::open_registry(store.path()).await;
    let (sha, _) = registry.upload(&archive, "s", None).await.unwrap();

    let auth = |secret: &str| FuncSettings {
        auth: BTreeMap::from([(
            "key".to_owned(),
            funcatron_control::state::SchemeCredentials {
                jwks_secret: Some(secret.to_owned()),
                ..Default::default()
            },
        )]),
        ..FuncSettings::default()
    };
    let cors = |origin: &str, credentials: bool| FuncSettings {
        cors: Some(funcatron_control::state::CorsSettings {
            origins: vec![origin.to_owned()],
            credentials,
            ..Default::default()
        }),
        ..FuncSettings::default()
    };
    let bad: [FuncSettings; 8] = [
        cors("*", true),
        cors("app.example.com", false),
        auth("../keys.json"),
        auth("FUNCATRON_READ_TOKEN"),
        FuncSettings {
            secrets: vec!["../../etc/passwd".into()],
            ..FuncSettings::default()
        },
        FuncSettings {
            secrets: vec!["FUNCATRON_TOKEN".into()],
            ..FuncSettings::default()
        },
        FuncSettings {
            env: BTreeMap::from([("BAD-KEY".to_owned(), "x".to_owned())]),
            ..FuncSettings::default()
        },
        FuncSettings {
            env: BTreeMap::from([(String::new(), "x".to_owned())]),
            ..FuncSettings::default()
        },
    ];
    for s in bad {
        let e = registry
            .enable("s", Some(&sha), Some(s.clone()), "enable")
            .await
            .err()
            .unwrap_or_else(|| panic!("accepted {s:?}"));
        assert_eq!((e.status, e.code), (422, "invalid_settings"), "{e}");
    }
    assert_eq!(
        registry.state().await.funcs["s"].enabled,
        None,
        "nothing changed"
    );

    let good = FuncSettings {
        secrets: vec!["API_KEY".into()],
        env: BTreeMap::from([("MODE".to_owned(), "fast".to_owned())]),
        ..FuncSettings::default()
    };
    let st = registry
        .enable("s", Some(&sha), Some(good), "enable")
        .await
        .unwrap();
    assert_eq!(st.funcs["s"].enabled.as_deref(), Some(sha.as_str()));
}

/// `.` and `..` are not Func names (they name directories in the store).
#[test]
fn dot_names_are_not_func_names() {
    assert!(!funcatron_bundle::valid_name("."));
    assert!(!funcatron_bundle::valid_name(".."));
    assert!(funcatron_bundle::valid_name("a.b"));
}

/// Bundles and settings past the operator's ceilings on `timeout_ms` and
/// `memory_mb` are refused (422), and nothing changes.
#[tokio::test]
async fn timeouts_and_memory_past_the_ceilings_are_refused() {
    use funcatron_tron::registry::Ceilings;
    let store = tempfile::tempdir().unwrap();
    let ceilings = Ceilings {
        max_timeout_ms: 1000,
        max_memory_mb: 64,
    };
    let registry = common::open_registry_with(store.path(), ceilings).await;
    for manifest in [", timeout_ms: 1001", ", memory_mb: 65"] {
        let e = registry
            .upload(&common::lua_archive(manifest), "s", None)
            .await
            .err()
            .unwrap_or_else(|| panic!("accepted a bundle with{manifest}"));
        assert_eq!((e.status, e.code), (422, "invalid_bundle"), "{e}");
        assert!(e.message.contains("ceiling"), "{e}");
    }
    assert!(registry.state().await.funcs.is_empty(), "nothing stored");

    let within = common::lua_archive(", timeout_ms: 1000, memory_mb: 64");
    let (sha, _) = registry.upload(&within, "s", None).await.unwrap();
    for s in [
        FuncSettings {
            timeout_ms: Some(1001),
            ..FuncSettings::default()
        },
        FuncSettings {
            memory_mb: Some(65),
            ..FuncSettings::default()
        },
    ] {
        let e = registry
            .enable("s", Some(&sha), Some(s.clone()), "enable")
            .await
            .err()
            .unwrap_or_else(|| panic!("accepted {s:?}"));
        assert_eq!((e.status, e.code), (422, "invalid_settings"), "{e}");
    }
    assert_eq!(registry.state().await.funcs["s"].enabled, None);
    let ok = FuncSettings {
        timeout_ms: Some(1000),
        memory_mb: Some(64),
        ..FuncSettings::default()
    };
    registry
        .enable("s", Some(&sha), Some(ok), "enable")
        .await
        .unwrap();
}

/// The default ceilings: 15 minutes and 4 GiB.
#[tokio::test]
async fn the_default_ceilings_refuse_a_day_long_timeout() {
    let store = tempfile::tempdir().unwrap();
    let registry = common::open_registry(store.path()).await;
    let e = registry
        .upload(&common::lua_archive(", timeout_ms: 86400000"), "s", None)
        .await
        .err()
        .unwrap();
    assert_eq!((e.status, e.code), (422, "invalid_bundle"), "{e}");
    let e = registry
        .upload(&common::lua_archive(", memory_mb: 8192"), "s", None)
        .await
        .err()
        .unwrap();
    assert_eq!((e.status, e.code), (422, "invalid_bundle"), "{e}");
}
