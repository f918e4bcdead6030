//! PostgreSQL over TLS with verified certificates. The servers are the real
//! PostgreSQL clusters, reached only through `fixtures/tls_proxy.py`, which
//! is TLS-only (the PyPI builds have no SSL): a certificate from a CA made
//! here, plain clients turned away. The tests compare rows over plain
//! connections to the servers themselves, which share nothing with vmig.
mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::online::{OnlineSource, Writer, online_scenario, source_artifacts};
use common::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

/// The test's certificates: a CA, the server's (for 127.0.0.1 only, so
/// `localhost` is a host name it does not hold), a client's, and an
/// unrelated CA.
struct Pki {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    other_ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    client_key_pem: String,
}

fn make_ca(name: &str) -> (CertificateParams, KeyPair, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let pem = params.self_signed(&key).unwrap().pem();
    (params, key, pem)
}

fn pki() -> Pki {
    let dir = tempdir();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let (ca_params, ca_key, ca_pem) = make_ca("vmig test CA");
    let issuer = Issuer::new(ca_params, ca_key);
    let (_, _, other_pem) = make_ca("some other CA");
    let leaf = |sans: Vec<String>, cn: &str| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(sans).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        (params.signed_by(&key, &issuer).unwrap().pem(), key.serialize_pem())
    };
    let (server_pem, server_key_pem) = leaf(vec!["127.0.0.1".into()], "127.0.0.1");
    let (client_pem, client_key_pem) = leaf(Vec::new(), "postgres");
    Pki {
        ca: write("ca.crt", &ca_pem),
        other_ca: write("other-ca.crt", &other_pem),
        server_cert: write("server.crt", &server_pem),
        server_key: write("server.key", &server_key_pem),
        client_cert: write("client.crt", &client_pem),
        client_key: write("client.key", &client_key_pem),
        client_key_pem,
        _dir: dir,
    }
}

/// A TLS-only front of one PostgreSQL server, on an ephemeral loopback port.
struct TlsFront {
    child: Child,
    port: u16,
}

impl TlsFront {
    fn start(server_url: &str, pki: &Pki, client_certificates: bool) -> TlsFront {
        let u = url::Url::parse(server_url).unwrap();
        let python = std::env::var("VMIG_TEST_PYTHON").unwrap_or("python3".into());
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls_proxy.py");
        let mut cmd = Command::new(python);
        cmd.arg(script)
            .args(["--upstream", &format!("{}:{}", u.host_str().unwrap(), u.port().unwrap())])
            .args(["--cert", pki.server_cert.to_str().unwrap(), "--key", pki.server_key.to_str().unwrap()]);
        if client_certificates {
            cmd.args(["--client-ca", pki.ca.to_str().unwrap()]);
        }
        let mut child = cmd.stdout(Stdio::piped()).spawn().expect("start the TLS front");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let port = line.trim().strip_prefix("port ").unwrap_or_else(|| panic!("TLS front said {line:?}")).parse().unwrap();
        TlsFront { child, port }
    }

    /// `plain_url`'s database through this front, with `params` (sslmode …).
    fn url(&self, plain_url: &str, host: &str, params: &str) -> String {
        let mut u = url::Url::parse(plain_url).unwrap();
        u.set_host(Some(host)).unwrap();
        u.set_port(Some(self.port)).unwrap();
        u.set_query(Some(params));
        u.to_string()
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn verify_full(pki: &Pki) -> String {
    format!("sslmode=verify-full&sslrootcert={}", pki.ca.display())
}

fn with_client_cert(pki: &Pki) -> String {
    format!("{}&sslcert={}&sslkey={}", verify_full(pki), pki.client_cert.display(), pki.client_key.display())
}

/// Every file under `dir`, as text.
fn texts_under(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(texts_under(&p));
        } else if let Ok(bytes) = std::fs::read(&p) {
            out.push((p, String::from_utf8_lossy(&bytes).into_owned()));
        }
    }
    out
}

/// Out of a TLS-only server and into one that also demands a client
/// certificate, both with verify-full; the rows equal, and no key path,
/// key contents or password reaches the output, the report or the state.
#[test]
fn offline_migrate_through_tls_only_servers_with_verified_certificates() {
    let pki = pki();
    let (src, dst) = dbs("tls_offline");
    ok(&["generate", "--to", &src, "--rows", "900", "--dim", "1536"]);
    let (src_front, dst_front) = (TlsFront::start(&src, &pki, false), TlsFront::start(&dst, &pki, true));
    let tls_src = src_front.url(&src, "127.0.0.1", &verify_full(&pki));
    let tls_dst = dst_front.url(&dst, "127.0.0.1", &with_client_cert(&pki));
    let state = tempdir();
    let report = state.path().join("report.json");
    let out = ok(&[
        "migrate", "--from", &tls_src, "--to", &tls_dst, "--chunk-rows", "300", "--workers", "2",
        "--state-root", state.path().to_str().unwrap(), "--report", report.to_str().unwrap(),
    ]);
    assert_eq!(assert_same_rows(&src, "modeldata", &dst, "modeldata"), 900);
    let verified = ok(&["verify", "--from", &tls_src, "--to", &tls_dst]);
    assert!(String::from_utf8_lossy(&verified.stdout).contains("equal"), "{}", String::from_utf8_lossy(&verified.stdout));

    let key_body = pki.client_key_pem.lines().nth(1).unwrap().to_string();
    let key_path = pki.client_key.to_str().unwrap().to_string();
    let mut seen = vec![
        ("stdout".into(), String::from_utf8_lossy(&out.stdout).into_owned()),
        ("stderr".into(), stderr(&out)),
    ];
    seen.extend(texts_under(state.path()));
    for (what, text) in seen {
        for secret in [key_body.as_str(), key_path.as_str(), ":postgres@"] {
            assert!(!text.contains(secret), "{what:?} holds {secret:?}");
        }
    }
}

/// An online job whose source (data sessions and the replication
/// connection) and target are reached only over verify-full TLS: killed
/// during its snapshot and while following, resumed, cut over; the target
/// equals the source.
#[test]
fn online_job_over_tls_survives_kills_and_cuts_over_exactly() {
    let name = "tls_online";
    let pki = pki();
    let src = fresh_db(&source_base(), &format!("{name}_src"), true);
    let dst = fresh_db(&target_base(), &format!("{name}_dst"), true);
    ok(&["generate", "--to", &src, "--rows", "1600", "--dim", "1536"]);
    let (src_front, dst_front) = (TlsFront::start(&src, &pki, false), TlsFront::start(&dst, &pki, false));
    let (w, l) = (src.clone(), src.clone());
    let artifact = format!("vmig_{name}");
    let source = OnlineSource {
        url: src_front.url(&src, "127.0.0.1", &verify_full(&pki)),
        extra_args: Vec::new(),
        writer: Box::new(move || Writer::start(&w)),
        leftovers: Box::new(move || {
            let (slots, pubs) = source_artifacts(&l, &artifact);
            if (slots, pubs) == (0, 0) { String::new() } else { format!("{slots} slots, {pubs} publications") }
        }),
    };
    let tls_dst = dst_front.url(&dst, "127.0.0.1", &verify_full(&pki));
    online_scenario(name, &source, &tls_dst, &|_| {
        assert_same_rows(&src, "modeldata", &dst, "modeldata");
    });
}

/// The error of a connection that fails, as the user sees it: one line.
fn connect_error(url: &str, other: &str) -> String {
    let out = vmig(&["verify", "--from", url, "--to", other]);
    assert_eq!(out.status.code(), Some(1), "connecting to {url} should fail");
    let err = stderr(&out);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "one error line: {err}");
    lines[0].to_string()
}

/// Each way TLS can fail says which, in one line naming the server, and
/// never falls back to plain text when `require` or stricter was asked.
#[test]
fn tls_failures_say_what_failed() {
    let pki = pki();
    let (src, dst) = dbs("tls_failures");
    ok(&["generate", "--to", &src, "--rows", "10", "--dim", "8"]);
    let front = TlsFront::start(&src, &pki, false);
    let cert_front = TlsFront::start(&src, &pki, true);
    let port = front.port;

    let e = connect_error(&front.url(&src, "127.0.0.1", &format!("sslmode=verify-full&sslrootcert={}", pki.other_ca.display())), &dst);
    assert!(e.contains(&format!("127.0.0.1:{port}")) && e.contains("not signed by the CA in sslrootcert"), "{e}");

    let e = connect_error(&front.url(&src, "localhost", &verify_full(&pki)), &dst);
    assert!(e.contains("does not name the host localhost"), "{e}");
    // verify-ca checks the chain only, so the same host name passes.
    ok(&["verify", "--from", &front.url(&src, "localhost", &format!("sslmode=verify-ca&sslrootcert={}", pki.ca.display())), "--to", &src]);

    // The plain server: require refuses it instead of falling back.
    let e = connect_error(&format!("{src}?sslmode=require"), &dst);
    assert!(e.contains("offers no TLS") && e.contains("sslmode=require"), "{e}");
    // The default (prefer) still reaches it, as libpq does.
    ok(&["verify", "--from", &src, "--to", &src]);

    // A plain client is turned away by the TLS-only server; allow retries with TLS.
    let e = connect_error(&front.url(&src, "127.0.0.1", "sslmode=disable"), &dst);
    assert!(e.contains("TLS connections only"), "{e}");
    ok(&["verify", "--from", &front.url(&src, "127.0.0.1", "sslmode=allow"), "--to", &src]);

    // A server demanding a client certificate: refused without one, in and out with one.
    let e = connect_error(&cert_front.url(&src, "127.0.0.1", &verify_full(&pki)), &dst);
    assert!(e.contains("client certificate"), "{e}");
    ok(&["verify", "--from", &cert_front.url(&src, "127.0.0.1", &with_client_cert(&pki)), "--to", &src]);

    let e = connect_error(&front.url(&src, "127.0.0.1", "sslmode=verify-full"), &dst);
    assert!(e.contains("sslrootcert"), "{e}");
}

/// A URL without a password: every session (data, and the replication
/// session of an online job) takes it from the password file or from
/// PGPASSWORD, as libpq does, and nothing warns; a password on the command
/// line draws one warning line.
#[test]
fn passwords_come_from_the_password_file_or_pgpassword() {
    use common::faults::{Moment, wait_for};
    let name = "pgpass";
    let (src, dst) = dbs(name);
    ok(&["generate", "--to", &src, "--rows", "500", "--dim", "64"]);
    let bare = |u: &str| {
        let mut u = url::Url::parse(u).unwrap();
        u.set_password(None).unwrap();
        u.to_string()
    };
    let (bare_src, bare_dst) = (bare(&src), bare(&dst));
    let dir = tempdir();
    let passfile = dir.path().join("pgpass");
    std::fs::write(&passfile, "# test\n127.0.0.1:*:*:postgres:postgres\n").unwrap();
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = Command::new(VMIG);
        cmd.args(args).env_remove("PGPASSWORD").env("PGPASSFILE", dir.path().join("none"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd
    };

    let out = run(&["verify", "--from", &bare_src, "--to", &bare_dst], &[]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("password"), "{}", stderr(&out));

    let state = tempdir();
    let job_dir = state.path().join(name);
    let args = ["migrate", "--online", "--from", &bare_src, "--to", &bare_dst, "--job", name, "--state-root", state.path().to_str().unwrap(), "--quiet"];
    let mut job = run(&args, &[("PGPASSFILE", passfile.to_str().unwrap())]).stderr(Stdio::piped()).spawn().unwrap();
    let _reap = common::online::Reaper(vec![job.id()]);
    wait_for(&mut job, &job_dir, "migrate", &Moment::Phase("following".into()), name);
    exec(&src, "UPDATE modeldata SET team_id = 'moved' WHERE id IN (SELECT id FROM modeldata ORDER BY id LIMIT 3)");
    common::online::wait_following(&mut job, &job_dir, "migrate", 2, name);
    let mut cut = args.to_vec();
    cut[0] = "cutover";
    let out = run(&cut, &[("PGPASSWORD", "postgres")]).output().unwrap();
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("safe to switch"), "{}", stderr(&out));
    let status = job.wait().unwrap();
    assert!(status.success(), "the online job ended with {status}");
    assert_same_rows(&src, "modeldata", &dst, "modeldata");
    let job_err = std::io::read_to_string(job.stderr.take().unwrap()).unwrap();
    assert!(!job_err.contains(PASSWORD_WARNING) && !raw_stderr(&out).contains(PASSWORD_WARNING), "{job_err}");

    let out = run(&["verify", "--from", &src, "--to", &dst], &[]).output().unwrap();
    assert!(out.status.success());
    assert_eq!(raw_stderr(&out).matches(PASSWORD_WARNING).count(), 1, "{}", raw_stderr(&out));
}

// ---------------------------------------------------------------- OceanBase / seekdb

/// A seekdb of the test's own serving TLS with the test's certificate (its
/// `wallet/`), with a user that must use TLS and one that must present a
/// client certificate (root stays plain for the test's own reads).
fn tls_seekdb(pki: &Pki) -> PrivateSeekdb {
    let ob = PrivateSeekdb::start_with(
        "tls",
        52997,
        |dir| {
            let wallet = dir.join("wallet");
            std::fs::create_dir_all(&wallet).unwrap();
            for (from, to) in [(&pki.ca, "ca.pem"), (&pki.server_cert, "server-cert.pem"), (&pki.server_key, "server-key.pem")] {
                std::fs::copy(from, wallet.join(to)).unwrap();
            }
        },
        &["--parameter", "ssl_client_authentication=true"],
    );
    let root = ob.url.replacen("mysql://root%40sys@", "mysql://root@", 1);
    for sql in [
        "CREATE USER vmig_tls IDENTIFIED BY 'tls-pw' REQUIRE SSL",
        "GRANT ALL PRIVILEGES ON *.* TO vmig_tls",
        "CREATE USER vmig_x509 IDENTIFIED BY 'x509-pw' REQUIRE X509",
        "GRANT ALL PRIVILEGES ON *.* TO vmig_x509",
        // seekdb turns away a client certificate whose CN it has not invited.
        "ALTER SYSTEM SET ob_ssl_invited_common_names = 'postgres'",
    ] {
        ob_exec(&root, sql);
    }
    ob
}

fn ob_tls_url(user: &str, password: &str, host: &str, port: u16, params: &str) -> String {
    format!("mysql://{user}:{password}@{host}:{port}/vmig?{params}")
}

/// Into and out of a TLS seekdb with verify_identity (and, out, a client
/// certificate): rows equal; each failure names itself in one line. Small
/// vectors: seekdb 1.4 drops TLS sessions whose statements pass ~18 KB and
/// stalls results past ~1 MB (plain sessions carry both), so 1536-d rows
/// cannot cross its TLS; docs/limits.md says so.
#[test]
fn oceanbase_over_tls_with_verified_certificates() {
    let pki = pki();
    let ob = tls_seekdb(&pki);
    let (src, dst) = dbs("ob_tls");
    ok(&["generate", "--to", &src, "--rows", "60", "--dim", "8"]);
    let ca = format!("ssl-ca={}", pki.ca.display());
    let into = ob_tls_url("vmig_tls", "tls-pw", "127.0.0.1", ob.port, &format!("ssl-mode=verify_identity&{ca}"));
    let state = tempdir();
    ok(&["migrate", "--from", &src, "--to", &into, "--chunk-rows", "20", "--state-root", state.path().to_str().unwrap()]);
    let stored = ob_rows(&ob.url, "modeldata");
    assert_rows_equal(&rows(&src, "modeldata"), &stored);

    let out_of = ob_tls_url(
        "vmig_x509",
        "x509-pw",
        "127.0.0.1",
        ob.port,
        &format!("ssl-mode=verify_identity&{ca}&ssl-cert={}&ssl-key={}", pki.client_cert.display(), pki.client_key.display()),
    );
    let out = ok(&["migrate", "--from", &out_of, "--to", &dst, "--chunk-rows", "20", "--state-root", state.path().to_str().unwrap()]);
    assert_eq!(rows(&dst, "modeldata"), stored, "PostgreSQL holds what seekdb stores, bit for bit");
    let key_path = pki.client_key.to_str().unwrap();
    for (what, text) in [("stdout", String::from_utf8_lossy(&out.stdout).into_owned()), ("stderr", stderr(&out))] {
        assert!(!text.contains(key_path) && !text.contains("x509-pw"), "{what} holds a secret: {text}");
    }

    let e = connect_error(&ob_tls_url("vmig_tls", "tls-pw", "127.0.0.1", ob.port, &format!("ssl-mode=verify_identity&ssl-ca={}", pki.other_ca.display())), &dst);
    assert!(e.contains("not signed by the CA in ssl-ca") && e.contains(&format!("127.0.0.1:{}", ob.port)), "{e}");
    let e = connect_error(&ob_tls_url("vmig_tls", "tls-pw", "localhost", ob.port, &format!("ssl-mode=verify_identity&{ca}")), &dst);
    assert!(e.contains("does not name the host localhost"), "{e}");
    // verify_ca is refused, never silently weaker (the driver cannot skip only the host name).
    let e = connect_error(&ob_tls_url("vmig_tls", "tls-pw", "localhost", ob.port, &format!("ssl-mode=verify_ca&{ca}")), &dst);
    assert!(e.contains("verify_identity"), "{e}");
    // The default (preferred) uses TLS where offered: the TLS-only user gets in.
    ok(&["verify", "--from", &ob_tls_url("vmig_tls", "tls-pw", "127.0.0.1", ob.port, ""), "--to", &dst]);
    // Plain text is refused for the TLS-only user; a certificate user needs its certificate.
    connect_error(&ob_tls_url("vmig_tls", "tls-pw", "127.0.0.1", ob.port, "ssl-mode=disabled"), &dst);
    connect_error(&ob_tls_url("vmig_x509", "x509-pw", "127.0.0.1", ob.port, &format!("ssl-mode=verify_identity&{ca}")), &dst);
    // REQUIRED against the shared seekdb, which offers no TLS, refuses rather than falling back.
    let plain = format!("{}?ssl-mode=required", fresh_ob_db("ob_tls_plain"));
    let e = connect_error(&plain, &dst);
    assert!(e.contains("offers no TLS") && e.contains("ssl-mode=REQUIRED"), "{e}");
}
