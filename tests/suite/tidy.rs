//! Tidy checks over the sources: layers name only what they may (STYLE.md, Layering).

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            files.push(path);
        }
    }
    files
}

/// The lines of a file that are code, not comments.
fn code_lines(path: &Path) -> impl Iterator<Item = String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .map(str::to_owned)
        .collect::<Vec<_>>()
        .into_iter()
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Files under `root` (relative to the workspace) that name `word`, except those under `allowed`.
fn offenders(root: &str, word: &str, allowed: &[&str]) -> Vec<String> {
    let base = workspace().join(root);
    rust_files(&base)
        .into_iter()
        .filter(|path| {
            !allowed
                .iter()
                .any(|allowed| path.starts_with(base.join(allowed)))
        })
        .filter(|path| code_lines(path).any(|line| line.contains(word)))
        .map(|path| {
            path.strip_prefix(workspace())
                .unwrap()
                .display()
                .to_string()
        })
        .collect()
}

#[test]
fn only_the_store_names_sea_orm() {
    assert_eq!(
        // The benchmark binary writes its raw-SQL baseline itself; that is the point of a baseline.
        offenders("api/src", "sea_orm", &["store", "bin"]),
        Vec::<String>::new()
    );
}

#[test]
fn only_the_graphql_layer_names_async_graphql() {
    assert_eq!(
        offenders("api/src", "async_graphql", &["graphql"]),
        Vec::<String>::new()
    );
}

#[test]
fn the_store_names_neither_graphql_nor_http() {
    assert_eq!(
        offenders("api/src/store", "async_graphql", &[]),
        Vec::<String>::new()
    );
    assert_eq!(
        offenders("api/src/store", "poem", &[]),
        Vec::<String>::new()
    );
    // The store is the bottom layer: it calls none of the layers above it.
    for upper in [
        "crate::service",
        "crate::auth",
        "crate::graphql",
        "crate::http",
        "crate::jobs",
    ] {
        assert_eq!(
            offenders("api/src/store", upper, &[]),
            Vec::<String>::new(),
            "the store names {upper}"
        );
    }
}

#[test]
fn the_edges_reach_the_store_only_through_the_services() {
    for edge in ["api/src/graphql", "api/src/http"] {
        assert_eq!(
            offenders(edge, "store::", &[]),
            Vec::<String>::new(),
            "{edge} names the store"
        );
    }
}

#[test]
fn the_domain_does_no_io_and_reads_no_clock() {
    for word in [
        "tokio",
        "sea_orm",
        "async_graphql",
        "poem",
        "lettre",
        "jsonwebtoken",
        "std::fs",
        "std::net",
        "Utc::now",
        "SystemTime",
        "Instant::now",
    ] {
        assert_eq!(
            offenders("domain/src", word, &[]),
            Vec::<String>::new(),
            "domain names {word}"
        );
    }
}

#[test]
fn migrations_depend_on_none_of_our_crates() {
    for word in ["domain::", "api::"] {
        assert_eq!(offenders("migration/src", word, &[]), Vec::<String>::new());
    }
}

#[test]
fn tenant_data_is_reached_only_through_tenant_or_system_transactions() {
    // Store functions take a TenantTx or SystemTx; only the tenant registry uses the raw pool.
    assert_eq!(
        offenders(
            "api/src",
            "registry()",
            &["store/mod.rs", "store/tenants.rs"]
        ),
        Vec::<String>::new()
    );
}

/// Every `"CDP_…"` name in `text`.
fn variable_names(text: &str) -> std::collections::BTreeSet<String> {
    text.split("\"CDP_")
        .skip(1)
        .filter_map(|rest| {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            rest[name.len()..]
                .starts_with('"')
                .then(|| format!("CDP_{name}"))
        })
        .collect()
}

/// The configuration reference (docs/configuration.md) is held to the code: every variable the
/// service reads is in it, every variable in it is read, and each default the code parses is
/// the default the reference gives.
#[test]
fn the_configuration_reference_matches_the_code() {
    let root = workspace();
    let mut read = std::collections::BTreeSet::new();
    for file in rust_files(&root.join("api/src")) {
        // The benchmark tool and the test harness have their own variables.
        // The reference names every variable, so it proves nothing about what is read.
        if file
            .components()
            .any(|part| part.as_os_str() == "cdp-bench")
            || file.ends_with("config_reference.rs")
        {
            continue;
        }
        read.extend(variable_names(&std::fs::read_to_string(&file).unwrap()));
    }
    read.retain(|name| !name.starts_with("CDP_TEST_"));
    let reference = std::fs::read_to_string(root.join("docs/configuration.md")).unwrap();
    // The file holds the generated tables, each between its markers, exactly.
    for block in api::config_reference::blocks() {
        assert!(
            reference.contains(&block),
            "docs/configuration.md differs from `cdp config`; put this in its place:\n{block}"
        );
    }
    let documented: std::collections::BTreeMap<String, String> = api::config_reference::VARIABLES
        .iter()
        .map(|variable| (variable.name.to_owned(), variable.default.to_owned()))
        .collect();
    let missing: Vec<_> = read
        .iter()
        .filter(|name| !documented.contains_key(*name))
        .collect();
    assert!(
        missing.is_empty(),
        "read by the code but not in api/src/config_reference.rs: {missing:?}"
    );
    let stale: Vec<_> = documented
        .keys()
        .filter(|name| !read.contains(*name))
        .collect();
    assert!(
        stale.is_empty(),
        "in api/src/config_reference.rs but read nowhere: {stale:?}"
    );

    let config = std::fs::read_to_string(root.join("api/src/config.rs")).unwrap();
    let mut checked = 0;
    for call in config.split("parse_var(").skip(1) {
        let mut quoted = call.split('"').skip(1).step_by(2);
        let (Some(name), Some(default)) = (quoted.next(), quoted.next()) else {
            continue;
        };
        if !name.starts_with("CDP_") {
            continue;
        }
        let cell = &documented[name];
        assert!(
            cell.contains(&format!("`{default}`")),
            "{name}: the code's default is {default:?}, config_reference.rs says {cell:?}"
        );
        checked += 1;
    }
    assert!(
        checked > 30,
        "only {checked} parsed defaults found: did parse_var change?"
    );
}
