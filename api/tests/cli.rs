//! The real `cdp` binary's account commands: what they print, and their exit status (0 done, 1
//! refused by the use case, 2 a malformed command line), on SQLite and, when
//! `CDP_TEST_POSTGRES_URL` is set, on PostgreSQL as the service's login role. Their effects are
//! checked in depth by `tests/suite/operator.rs`, in process.
#![allow(clippy::unwrap_used, clippy::expect_used)]

// Not every helper of the suite is used here.
#[allow(unused_imports)]
#[path = "../../tests/suite/support/mod.rs"]
mod support;

use std::process::{Command, Output};

use serde_json::Value;

use support::{backends, TestDb};

/// Runs `cdp ARGS…` on the test database and waits for it.
fn cdp(db: &TestDb, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cdp"))
        .args(args)
        .env("CDP_DATABASE_URL", &db.service_url)
        .env("CDP_DATA_DIR", &db.data_dir)
        .env("CDP_PUBLIC_URL", "http://cdp.test")
        .env("CDP_LOG", "error")
        .env("USER", "bin-tester")
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .env_remove("CDP_SMTP_URL")
        .output()
        .expect("cdp runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts the exit status and returns standard output.
fn expect(output: Output, code: i32, stderr_has: &str) -> String {
    let stderr = text(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(code),
        "stdout: {}\nstderr: {stderr}",
        text(&output.stdout)
    );
    assert!(
        stderr.contains(stderr_has),
        "{stderr_has:?} not in {stderr}"
    );
    text(&output.stdout)
}

#[tokio::test]
async fn the_cdp_binary_runs_account_commands_and_exits_non_zero_when_refused() {
    for backend in backends() {
        let db = TestDb::create(backend).await;
        let out = expect(
            cdp(
                &db,
                &[
                    "tenant",
                    "create",
                    "--slug",
                    "bin",
                    "--name",
                    "Bin",
                    "--owner-email",
                    "owner@bin.example",
                ],
            ),
            0,
            "",
        );
        assert!(
            out.contains("activation link: http://cdp.test/activate?token=act_"),
            "{out}"
        );

        let out = expect(
            cdp(
                &db,
                &[
                    "user",
                    "invite",
                    "--tenant",
                    "bin",
                    "--email",
                    "ann@bin.example",
                    "--role",
                    "analyst",
                    "--role",
                    "viewer",
                ],
            ),
            0,
            "",
        );
        assert!(
            out.contains("activation link: http://cdp.test/activate?token=act_"),
            "{out}"
        );
        expect(
            cdp(
                &db,
                &[
                    "user",
                    "invite",
                    "--tenant",
                    "bin",
                    "--email",
                    "ann@bin.example",
                    "--role",
                    "viewer",
                ],
            ),
            1,
            "a user with this email already exists",
        );
        expect(
            cdp(
                &db,
                &[
                    "user",
                    "invite",
                    "--tenant",
                    "bin",
                    "--email",
                    "bob@bin.example",
                    "--role",
                    "wizard",
                ],
            ),
            1,
            "there is no role named \"wizard\"",
        );
        expect(
            cdp(&db, &["user", "list", "--tenant", "nope"]),
            1,
            "there is no tenant with the slug \"nope\"",
        );
        let users: Value = serde_json::from_str(&expect(
            cdp(&db, &["user", "list", "--tenant", "bin", "--json"]),
            0,
            "",
        ))
        .unwrap();
        assert_eq!(users[1]["email"], "ann@bin.example");
        assert_eq!(users[1]["roles"], serde_json::json!(["analyst", "viewer"]));

        expect(
            cdp(
                &db,
                &[
                    "apikey", "create", "--tenant", "bin", "--name", "site", "--scope", "READ",
                ],
            ),
            2,
            "invalid value 'READ'",
        );
        let out = expect(
            cdp(
                &db,
                &[
                    "apikey",
                    "create",
                    "--tenant",
                    "bin",
                    "--name",
                    "site",
                    "--scope",
                    "WRITE",
                    "--channel",
                    "WEB",
                ],
            ),
            0,
            "",
        );
        assert!(out.lines().last().unwrap().starts_with("cdp_wk_"), "{out}");
        expect(
            cdp(&db, &["apikey", "revoke", "--tenant", "bin", "site"]),
            0,
            "",
        );
        expect(
            cdp(&db, &["apikey", "revoke", "--tenant", "bin", "site"]),
            1,
            "there is no unrevoked api key",
        );

        let tenants: Value =
            serde_json::from_str(&expect(cdp(&db, &["tenant", "list", "--json"]), 0, "")).unwrap();
        assert_eq!(tenants[0]["slug"], "bin");
        assert_eq!(tenants[0]["users"], 2);
        expect(
            cdp(&db, &["tenant", "show", "nope"]),
            1,
            "there is no tenant",
        );
        let help = expect(cdp(&db, &["user", "invite", "--help"]), 0, "");
        assert!(help.contains("--role <ROLES>"), "{help}");
    }
}
