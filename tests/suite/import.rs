//! `cdp import`: JSON lines through the same write path, with counts and a side file of rejects.

use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn an_import_loads_valid_lines_counts_duplicates_and_writes_rejects_with_reasons() {
    for backend in backends() {
        let smtp = SmtpSink::start().await;
        let server = TestServer::start(backend, &smtp).await;
        let tenant_slug = slug("import");
        let owner = new_tenant(&server, &smtp, &tenant_slug, "owner@import.example").await;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("history.jsonl");
        let mut lines = Vec::new();
        for i in 0..1200 {
            lines.push(json!({"type": "track", "userId": format!("imp-{}", i % 40), "event": "Order Completed", "properties": {"revenue": i}, "timestamp": "2026-10-01T00:00:00Z", "messageId": format!("imp-{i}")}).to_string());
        }
        lines.push(json!({"type": "track", "userId": "imp-0", "event": "Order Completed", "messageId": "imp-5"}).to_string());
        lines.push("{not json".to_owned());
        lines.push(json!({"type": "track", "event": "Nobody", "messageId": "nobody"}).to_string());
        lines.push(String::new());
        std::fs::write(&file, lines.join("\n")).unwrap();

        let state = server.app.as_ref().unwrap().state();
        let summary = api::cli::import(state, &tenant_slug, file.to_str().unwrap(), None, false)
            .await
            .unwrap();
        assert_eq!(
            (summary.accepted, summary.duplicates, summary.rejected),
            (1200, 1, 2)
        );
        let rejected_file = summary.rejected_file.unwrap();
        let rejects: Vec<serde_json::Value> = std::fs::read_to_string(&rejected_file)
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(rejects.len(), 2);
        assert_eq!(rejects[0]["line"], 1202);
        assert!(rejects[0]["reason"]
            .as_str()
            .unwrap()
            .starts_with("invalid_json"));
        assert_eq!(rejects[1]["line"], 1203);
        assert!(rejects[1]["reason"]
            .as_str()
            .unwrap()
            .starts_with("missing_identity"));

        let token = owner.access_token.as_str();
        let total = server
            .gql_ok(
                Some(token),
                "{ events { totalCount } profiles { totalCount } }",
                json!({}),
            )
            .await;
        assert_eq!(
            (
                total["events"]["totalCount"].clone(),
                total["profiles"]["totalCount"].clone()
            ),
            (json!(1200), json!(40))
        );
        // Importing the same file again stores nothing twice.
        let again = api::cli::import(state, &tenant_slug, file.to_str().unwrap(), None, false)
            .await
            .unwrap();
        assert_eq!((again.accepted, again.duplicates), (0, 1201));
        assert!(
            api::cli::import(state, "no-such-tenant", file.to_str().unwrap(), None, false)
                .await
                .is_err()
        );
        server.stop().await;
    }
}
