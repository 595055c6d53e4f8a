//! user-service against its own OpenAPI document: every documented route
//! is served, and real answers (successes and every error) have the
//! documented status and shape. Also pagination and the docs page.

#![allow(clippy::unwrap_used)] // Tests: a panic is the failure report.

use axum::http::StatusCode;
use service_kit::contract::Contract;
use service_kit::testing::{docs_page_is_self_contained, get_raw};
use user_service::{AppState, app, open_db};

#[tokio::test]
async fn answers_match_the_document() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(AppState {
        db: open_db(&dir.path().join("users.db")).await.unwrap(),
    });
    let contract = Contract::of(&app).await;
    let mut documented = contract.operations();
    documented.sort();
    assert_eq!(
        documented,
        [
            ("/health", "get"),
            ("/metrics", "get"),
            ("/users", "get"),
            ("/users", "post"),
            ("/users/{id}", "get"),
        ]
        .map(|(p, m)| (p.to_owned(), m.to_owned()))
    );
    contract.every_operation_is_routed().await;
    assert_eq!(
        contract.document["tags"][0]["name"], "users",
        "tags per resource"
    );

    let john = r#"{"username":"john_doe","email":"john@example.com","full_name":"John Doe"}"#;
    for (method, template, uri, body, expected) in [
        ("POST", "/users", "/users", Some(john), StatusCode::CREATED),
        ("POST", "/users", "/users", Some(john), StatusCode::CONFLICT),
        (
            "POST",
            "/users",
            "/users",
            Some(r#"{"username":"","email":"a@b.c","full_name":"A"}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "POST",
            "/users",
            "/users",
            Some(r#"{"username":"x"}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "POST",
            "/users",
            "/users",
            Some("{not json"),
            StatusCode::BAD_REQUEST,
        ),
        ("GET", "/users", "/users", None, StatusCode::OK),
        (
            "GET",
            "/users",
            "/users?limit=0",
            None,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        (
            "GET",
            "/users",
            "/users?after_id=x",
            None,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        ("GET", "/users/{id}", "/users/1", None, StatusCode::OK),
        (
            "GET",
            "/users/{id}",
            "/users/99",
            None,
            StatusCode::NOT_FOUND,
        ),
        (
            "GET",
            "/users/{id}",
            "/users/abc",
            None,
            StatusCode::UNPROCESSABLE_ENTITY,
        ),
        ("GET", "/health", "/health", None, StatusCode::OK),
    ] {
        let (status, answer) = contract.call(method, template, uri, body).await;
        assert_eq!(status, expected, "{method} {uri}: {answer}");
    }
}

#[tokio::test]
async fn lists_are_paginated_with_a_link_to_the_next_page() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(AppState {
        db: open_db(&dir.path().join("users.db")).await.unwrap(),
    });
    for n in 0..5 {
        let body =
            format!(r#"{{"username":"u{n}","email":"u{n}@example.com","full_name":"U {n}"}}"#);
        let (status, _) = service_kit::testing::call(&app, "POST", "/users", Some(&body)).await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let mut uri = "/users?limit=2".to_owned();
    let mut seen = Vec::new();
    for _ in 0..5 {
        let (status, headers, body) = get_raw(&app, &uri).await;
        assert_eq!(status, StatusCode::OK);
        let page: Vec<serde_json::Value> = serde_json::from_slice(&body).unwrap();
        assert!(page.len() <= 2);
        seen.extend(page.iter().map(|u| u["id"].as_i64().unwrap()));
        let Some(link) = headers.get("link") else {
            break;
        };
        let link = link.to_str().unwrap();
        let next = link
            .strip_prefix("<")
            .and_then(|l| l.split_once(">; rel=\"next\""))
            .unwrap()
            .0;
        uri = format!("/users{next}");
    }
    assert_eq!(seen, [1, 2, 3, 4, 5], "every user once, in id order");
    // The last page has no link; a page that fits has none either.
    let (_, headers, _) = get_raw(&app, "/users?limit=5").await;
    assert!(headers.get("link").is_none());
    let (_, headers, body) = get_raw(&app, "/users?after_id=3").await;
    assert!(headers.get("link").is_none());
    let page: Vec<serde_json::Value> = serde_json::from_slice(&body).unwrap();
    assert_eq!(page.len(), 2);
    // 1000 is the most a page may hold.
    assert_eq!(get_raw(&app, "/users?limit=1000").await.0, StatusCode::OK);
    assert_eq!(
        get_raw(&app, "/users?limit=1001").await.0,
        StatusCode::UNPROCESSABLE_ENTITY
    );
}

#[tokio::test]
async fn the_docs_page_works_offline() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(AppState {
        db: open_db(&dir.path().join("users.db")).await.unwrap(),
    });
    docs_page_is_self_contained(&app).await;
}

/// What the document admits and what the handler admits are the same set:
/// white space of every kind (Unicode's, which the handler trims, against
/// ECMA-262's `\s`, which differs), lengths with and without surrounding
/// spaces, non-ASCII names. Found by schemathesis: an e-mail with U+0085
/// in it fitted `\s`-based pattern and was refused.
#[tokio::test]
async fn the_document_admits_exactly_what_the_handler_takes() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(AppState {
        db: open_db(&dir.path().join("users.db")).await.unwrap(),
    });
    let contract = Contract::of(&app).await;
    let spaces = [
        " ", "\t", "\u{b}", "\u{85}", "\u{a0}", "\u{1680}", "\u{2007}", "\u{2028}", "\u{202f}",
        "\u{3000}",
    ];
    let not_spaces = ["\u{feff}", "\u{1c}", "\u{200b}", "\u{180e}", "\u{0}"];
    let mut cases: Vec<(String, String, String)> = Vec::new();
    for (i, s) in spaces.iter().chain(&not_spaces).enumerate() {
        cases.push((format!("u{i}"), format!("a{i}{s}b@example.com"), "N".into()));
        cases.push((
            format!("{s}v{i}{s}"),
            format!("{s}v{i}@example.com{s}"),
            format!("{s}N{s}"),
        ));
        cases.push((
            format!("w{i}{s}"),
            format!("w{i}@exa{s}mple.com"),
            (*s).to_owned(),
        ));
        cases.push((
            format!("x{i}"),
            format!("x{i}@example{s}com"),
            format!("{s}{s}"),
        ));
    }
    let fifty = "y".repeat(50);
    cases.push((fifty.clone(), "y@example.com".into(), "Y".into()));
    cases.push((format!(" {fifty}"), "y1@example.com".into(), "Y".into()));
    cases.push(("jöhn".into(), "j@example.com".into(), "J".into()));
    cases.push(("z".into(), "z@@example.com".into(), "Z".into()));
    cases.push(("z1".into(), "z1@example.".into(), "Z".into()));
    cases.push(("z2".into(), "z2@.example.com".into(), "Z".into()));
    cases.push(("z3".into(), "@example.com".into(), "Z".into()));
    cases.push(("z4".into(), "z4@example.com".into(), "Z".repeat(201)));
    let bodies = cases.into_iter().map(|(username, email, full_name)| {
        serde_json::json!({"username": username, "email": email, "full_name": full_name})
            .to_string()
    });
    let (fitted, refused) = contract
        .admits_exactly_what_it_creates("POST", "/users", bodies)
        .await;
    assert!(
        fitted > 10 && refused > 10,
        "{fitted} fitted, {refused} refused"
    );
}
