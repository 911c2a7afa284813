//! The `fogmesh` binary: JSON shapes, split equivalence through the CLI, and
//! clear errors (never panics) for bad arguments. Needs the default model.

mod common;

use std::process::Command;

fn fogmesh(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fogmesh")).args(args).output().expect("run fogmesh");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn json(args: &[&str]) -> serde_json::Value {
    let (ok, out, err) = fogmesh(args);
    assert!(ok, "fogmesh {args:?} failed: {err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

#[test]
fn generate_json_has_the_documented_shape_and_split_changes_nothing() {
    let Some(model) = common::model_path() else { return };
    let m = model.to_str().unwrap();
    let base = ["generate", "--model", m, "--raw", "--prompt", "The capital of France is", "--temperature", "0"];
    let mut args = base.to_vec();
    args.extend(["--max-tokens", "8", "--json", "--top-logits", "3"]);
    let one = json(&args);
    assert_eq!(one["prompt_tokens"], serde_json::json!([504, 3575, 282, 4649, 314]));
    assert_eq!(one["tokens"].as_array().unwrap().len(), 8);
    assert_eq!(one["tokens"][0], 7042);
    assert!(one["text"].as_str().unwrap().starts_with(" Paris"));
    for k in ["prefill_tokens", "prefill_ms", "decode_tokens", "decode_ms"] {
        assert!(one["timings"][k].is_number(), "timings.{k}");
    }
    let top = one["top_logits"].as_array().unwrap();
    assert_eq!(top.len(), 8);
    assert_eq!(top[0].as_array().unwrap().len(), 3);
    assert!(top[0][0]["id"].is_number() && top[0][0]["logit"].is_number());
    args.extend(["--split", "3"]);
    let split = json(&args);
    assert_eq!(split["tokens"], one["tokens"]);
    assert_eq!(split["top_logits"], one["top_logits"]);
}

#[test]
fn chat_mode_and_streaming_text_work() {
    let Some(model) = common::model_path() else { return };
    let (ok, out, err) = fogmesh(&["generate", "--model", model.to_str().unwrap(), "-p", "Name a color.", "-n", "12"]);
    assert!(ok, "{err}");
    assert!(!out.trim().is_empty(), "no text streamed");
    assert!(err.contains("tok/s"), "no timing line: {err}");
}

#[test]
fn score_json_reports_top_logits_per_position() {
    let Some(model) = common::model_path() else { return };
    let v = json(&["score", "--model", model.to_str().unwrap(), "--tokens", "504,3575,282,4649,314", "--json"]);
    assert_eq!(v["tokens"], serde_json::json!([504, 3575, 282, 4649, 314]));
    let top = v["top_logits"].as_array().unwrap();
    assert_eq!(top.len(), 5);
    assert_eq!(top[4][0]["id"], 7042, "after 'is' comes ' Paris'");
    assert_eq!(top[4].as_array().unwrap().len(), 5);
}

#[test]
fn bad_arguments_give_clear_errors() {
    let Some(model) = common::model_path() else { return };
    let m = model.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["generate", "--model", "/nonexistent.gguf", "-p", "x"], "does not exist"),
        (&["generate", "--model", m, "-p", "x", "--split", "31"], "cannot cut 30 layers into 31"),
        (&["generate", "--model", m, "-p", "x", "--temperature=-1"], "temperature"),
        (&["generate", "--model", m, "-p", "x", "--top-p", "0"], "top_p"),
        (&["generate", "--model", m, "-p", "x", "--threads", "0"], "--threads"),
        (&["score", "--model", m, "--tokens", "1,99999999"], "outside the vocabulary"),
        (&["score", "--model", m, "--tokens", "1,x"], "invalid"),
        (&["generate", "--model", "Cargo.toml", "-p", "x"], "bad magic"),
        (&["node", "--activations", "int4"], "choose one of auto, lossless, f16, bf16, int8o"),
    ];
    for (args, needle) in cases {
        let (ok, _, err) = fogmesh(args);
        assert!(!ok, "{args:?} succeeded");
        assert!(err.contains(needle), "{args:?}: stderr {err:?} lacks {needle:?}");
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    }
}

/// `fogmesh` with extra environment variables.
fn fogmesh_env(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_fogmesh"));
    c.args(args).env_remove("FOGMESH_CONFIG");
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().expect("run fogmesh");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn config_file_and_environment_mirror_the_flags() {
    // No node listens on these ports: the error names the address used, so
    // it shows which setting won (flag > environment > file > default).
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    std::fs::write(&cfg, "threads = 1\n[status]\nnode = \"127.0.0.1:9\"\n").unwrap();
    let c = cfg.to_str().unwrap();
    let home = [("FOGMESH_HOME", dir.path().to_str().unwrap())];
    let (ok, _, err) = fogmesh_env(&["status", "--config", c], &home);
    assert!(!ok && err.contains("127.0.0.1:9"), "the file's setting: {err}");
    let (_, _, err) = fogmesh_env(&["status", "--config", c], &[home[0], ("FOGMESH_NODE", "127.0.0.1:10")]);
    assert!(err.contains("127.0.0.1:10"), "the environment beats the file: {err}");
    let (_, _, err) = fogmesh_env(&["status", "--config", c, "--node", "127.0.0.1:11"], &[home[0], ("FOGMESH_NODE", "127.0.0.1:10")]);
    assert!(err.contains("127.0.0.1:11"), "the flag beats both: {err}");
    // The default file in $FOGMESH_HOME, and the file named by FOGMESH_CONFIG.
    let (_, _, err) = fogmesh_env(&["status"], &home);
    assert!(err.contains("127.0.0.1:9"), "$FOGMESH_HOME/config.toml is read: {err}");
    let (_, _, err) = fogmesh_env(&["status"], &[("FOGMESH_HOME", "/nonexistent"), ("FOGMESH_CONFIG", c)]);
    assert!(err.contains("127.0.0.1:9"), "FOGMESH_CONFIG names the file: {err}");
    // Mistakes are named, not ignored.
    let bad: &[(&str, &str)] = &[
        ("bogus = 1\n", "bogus is not a flag of any fogmesh command"),
        ("[node]\nprompt = \"x\"\n", "`fogmesh node` has no flag --prompt"),
        ("[nodes]\nhttp = \"x\"\n", "[nodes] is not a fogmesh command"),
        ("[status]\njson = \"yes\"\n", "json is a switch"),
        ("node = [\n", "not valid TOML"),
    ];
    for (text, needle) in bad {
        std::fs::write(&cfg, text).unwrap();
        let (ok, _, err) = fogmesh_env(&["status", "--config", c], &home);
        assert!(!ok && err.contains(needle), "{text:?}: {err}");
    }
    // A command's table beats the top level whatever the keys' order: the
    // top-level value would not even parse.
    std::fs::write(&cfg, "temperature = \"hot\"\n[generate]\ntemperature = 0\n").unwrap();
    let (ok, _, err) = fogmesh_env(&["generate", "--config", c, "--model", "/nonexistent.gguf", "-p", "x"], &home);
    assert!(!ok && err.contains("does not exist") && !err.contains("invalid value"), "{err}");
    let (ok, _, err) = fogmesh_env(&["status", "--config", "/nonexistent.toml"], &home);
    assert!(!ok && err.contains("does not exist"), "{err}");
}

#[test]
fn help_has_examples() {
    for cmd in [&["--help"][..], &["node", "--help"], &["run", "--help"], &["status", "--help"], &["demo", "--help"]] {
        let (ok, out, _) = fogmesh(cmd);
        assert!(ok);
        assert!(out.contains("fogmesh ") && (out.contains("Example") || out.contains("Quick start")), "{cmd:?}:\n{out}");
    }
}

#[test]
fn the_demo_ignores_the_callers_node_settings() {
    // A config file and variables that would break any `fogmesh node` the
    // demo starts if its peers inherited them.
    let Some(model) = common::model_path() else { return };
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.toml"), "[node]\nhttp = \"not-an-address\"\n").unwrap();
    let env = [
        ("FOGMESH_HOME", dir.path().to_str().unwrap()),
        ("FOGMESH_MODEL", model.to_str().unwrap()),
        ("FOGMESH_BOOTSTRAP", "not-a-multiaddr"),
        ("FOGMESH_PEER_TTL", "-1"),
    ];
    let (ok, out, err) = fogmesh_env(&["demo", "--peers", "2", "--max-tokens", "4", "--temperature", "0"], &env);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("peers stopped cleanly"), "{out}");
}

/// Invites on the command line (no model, no root): a private node and a
/// node that joins it on loopback meet; bad tokens and conflicting flags
/// are clear errors before anything starts.
#[test]
fn private_nodes_print_invites_and_bad_tokens_are_clear_errors() {
    use fogmesh::node::mesh::Invite;
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| dir.path().join(n).to_string_lossy().into_owned();
    for (args, needle) in [
        (vec!["node", "--join", "hello"], "not a fogmesh invite"),
        (vec!["node", "--join", "fogmesh1.AAAA"], "damaged"),
        (vec!["node", "--private", "--secret", &"ab".repeat(32)], "cannot be used with"),
    ] {
        let (ok, _, err) = fogmesh(&[&args[..], &["--http", "127.0.0.1:0", "--data-dir", &d("x")]].concat());
        assert!(!ok && err.contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let open = Invite { secret: None, addrs: vec!["/ip4/127.0.0.1/tcp/9".parse().unwrap()] }.encode();
    let (ok, _, err) = fogmesh(&["node", "--join", &open, "--secret", &"ab".repeat(32), "--http", "127.0.0.1:0", "--data-dir", &d("y")]);
    assert!(!ok && err.contains("open mesh"), "{err}");

    // A private node prints its invite; `fogmesh invite` prints it again;
    // the secret file stays the same across restarts.
    let spawn = |extra: &[&str], data: &str, env: Option<&str>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_fogmesh"));
        c.args(["node", "--no-mdns", "--listen", "/ip4/127.0.0.1/tcp/0", "--http", "127.0.0.1:0", "--data-dir", data]).args(extra);
        if let Some(t) = env {
            c.env("FOGMESH_JOIN", t);
        }
        c.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap()
    };
    let mut a = spawn(&["--private"], &d("a"), None);
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(a.stdout.take().unwrap()));
    let token = lines.find(|l| l.as_ref().is_ok_and(|l| l.starts_with("fogmesh1."))).unwrap().unwrap();
    let invite = Invite::decode(&token).unwrap();
    assert!(invite.secret.is_some() && !invite.addrs.is_empty());
    let secret_file = std::fs::read_to_string(dir.path().join("a").join("cluster.key")).unwrap();
    assert_eq!(secret_file.trim(), invite.secret.map(hex_of).unwrap());
    let (ok, out, err) = fogmesh(&["invite", "--data-dir", &d("a")]);
    assert!(ok, "{err}");
    assert_eq!(Invite::decode(out.lines().last().unwrap()).unwrap().secret, invite.secret, "{out}");
    // A node with the token joins: both see each other.
    let mut b = spawn(&[], &d("b"), Some(&token));
    let t0 = std::time::Instant::now();
    loop {
        let (ok, out, _) = fogmesh(&["peers", "--json", "--data-dir", &d("b")]);
        if ok && out.contains("12D3") {
            break;
        }
        assert!(t0.elapsed() < std::time::Duration::from_secs(20), "the invited node met nobody: {out}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    for c in [&mut a, &mut b] {
        let _ = c.kill();
        let _ = c.wait();
    }
}

fn hex_of(b: [u8; 32]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `fogmesh fetch --list` names the catalogue; `fogmesh tokenize` prints
/// ids (plain text never parses as control tokens unless `--special`); an
/// unknown model name is a clear error. Needs the default model.
#[test]
fn the_catalogue_and_tokenize() {
    let Some(model) = common::model_path() else { return };
    let (ok, out, err) = fogmesh(&["fetch", "--list"]);
    assert!(ok, "{err}");
    assert!(out.contains("smollm2-135m") && out.contains("gemma3-270m"), "{out}");
    let m = model.to_str().unwrap();
    let v = json(&["tokenize", "--model", m, "--json", "The capital of France is"]);
    assert_eq!(v["ids"], serde_json::json!([504, 3575, 282, 4649, 314]));
    let plain = json(&["tokenize", "--model", m, "--json", "<|im_start|>user"]);
    let special = json(&["tokenize", "--model", m, "--json", "--special", "<|im_start|>user"]);
    assert_eq!(special["ids"][0], 1, "<|im_start|> parsed with --special: {special}");
    assert_ne!(plain["ids"][0], 1, "and plain text without it: {plain}");
    let (ok, out, _) = fogmesh(&["tokenize", "--model", m, "Hi"]);
    assert!(ok && out.trim().split(' ').all(|t| t.parse::<u32>().is_ok()), "{out}");
    let (ok, _, err) = fogmesh(&["tokenize", "--model", "no-such-model", "x"]);
    assert!(!ok && err.contains("no catalogue name") && err.contains("gemma3-270m"), "{err}");
    let (ok, _, err) = fogmesh(&["fetch", "no-such-model"]);
    assert!(!ok && err.contains("fetch --list"), "{err}");
}

/// `fogmesh id`: the id a host without the file serves the model under,
/// the file's SHA-256 and its manifest's digest (the catalogue's); a file
/// that is not a model is a clear error.
#[test]
fn id_names_the_model_by_its_hash_and_manifest() {
    let Some(model) = common::model_path() else { return };
    let v = json(&["id", "--model", model.to_str().unwrap(), "--json"]);
    let c = &fogmesh::models::CATALOGUE[0];
    assert_eq!(v["id"], format!("sha256:{}@{}", c.sha256, c.manifest));
    assert_eq!(v["bytes"], c.bytes);
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.gguf");
    std::fs::write(&junk, b"not a model").unwrap();
    let (ok, _, err) = fogmesh(&["id", "--model", junk.to_str().unwrap()]);
    assert!(!ok && !err.contains("panicked") && err.contains("junk.gguf"), "{err}");
}
