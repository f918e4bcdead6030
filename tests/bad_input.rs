//! Bad rows go to rejects/ with chunk, id and reason; bad settings give one clear line.
mod common;
use common::*;

#[test]
fn wrong_dimension_null_vector_and_long_strings_are_rejected_not_lost() {
    let (src, dst) = dbs("badrows");
    exec(&src, "CREATE TABLE modeldata (id BIGSERIAL PRIMARY KEY, vector VECTOR, team_id VARCHAR(50) NOT NULL, \
        dataset_id VARCHAR(50) NOT NULL, collection_id VARCHAR(50) NOT NULL, createtime TIMESTAMP DEFAULT CURRENT_TIMESTAMP);
        INSERT INTO modeldata (id, vector, team_id, dataset_id, collection_id)
          SELECT i, ARRAY[i, 1, 2, 3]::real[]::vector, 'team', 'd', 'c' FROM generate_series(1, 300) i;
        INSERT INTO modeldata (id, vector, team_id, dataset_id, collection_id) VALUES
          (1001, '[1,2,3]', 'team', 'd', 'c'), (1002, NULL, 'team', 'd', 'c'), (1003, '[1,2,3,4]', 'team-too-long', 'd', 'c');");
    // The target exists with a narrower team_id.
    exec(&dst, "CREATE TABLE modeldata (id BIGSERIAL PRIMARY KEY, vector VECTOR(4), team_id VARCHAR(8) NOT NULL, \
        dataset_id VARCHAR(50) NOT NULL, collection_id VARCHAR(50) NOT NULL, createtime TIMESTAMP DEFAULT CURRENT_TIMESTAMP)");
    let state = tempdir();
    let sr = state.path().to_str().unwrap();
    let out = vmig(&["migrate", "--from", &src, "--to", &dst, "--chunk-rows", "100", "--state-root", sr, "--job", "bad"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("3 rows rejected"), "{}", stderr(&out));
    let r = rejects(&state.path().join("bad"));
    assert_eq!(r.len(), 3, "{r:?}");
    assert_eq!(r[0].0, 1001);
    assert!(r[0].1.contains("3 dimensions"), "{r:?}");
    assert_eq!(r[1].0, 1002);
    assert!(r[1].1.contains("NULL"), "{r:?}");
    assert_eq!(r[2].0, 1003);
    assert!(r[2].1.contains("13 characters") && r[2].1.contains("allows 8"), "{r:?}");
    // Every good row arrived; the rejected ones did not.
    let good = rows(&src, "(SELECT * FROM modeldata WHERE id <= 300) AS good");
    assert_eq!(good.len(), 300);
    assert_eq!(rows(&dst, "modeldata"), good, "the good rows arrived exactly, the rejected ones not at all");
    // Accepting the rejects makes the (resumed) run a success.
    ok(&["migrate", "--from", &src, "--to", &dst, "--chunk-rows", "100", "--state-root", sr, "--job", "bad", "--max-rejects", "3"]);
}

#[test]
fn nan_in_staged_vectors_is_rejected_with_its_id() {
    let (src, dst) = dbs("nanrows");
    ok(&["generate", "--to", &src, "--rows", "50", "--dim", "8"]);
    let dir = tempdir();
    let st = dir.path().join("st");
    let (bad5, bad9) = stage_with_nan_and_inf(&src, &st);
    let out = vmig(&["import", "--staging", st.to_str().unwrap(), "--to", &dst]);
    assert_eq!(out.status.code(), Some(1));
    let r = rejects(&st);
    assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), vec![bad5, bad9]);
    assert!(r[0].1.contains("NaN") && r[1].1.contains("inf"), "{r:?}");
    let good: Vec<Row> = rows(&src, "modeldata").into_iter().filter(|r| r.id != bad5 && r.id != bad9).collect();
    assert_eq!(good.len(), 48);
    assert_eq!(rows(&dst, "modeldata"), good, "every other row arrived exactly");
}

fn one_clear_line(out: &std::process::Output, expect: &str) {
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(out);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line: {err}");
    assert!(lines[0].starts_with("error: ") && lines[0].contains(expect), "{err}");
    assert!(!err.contains("s3cret") && !err.contains(":postgres@"), "secret leaked: {err}");
}

#[test]
fn unreachable_wrong_password_missing_table() {
    let (src, _) = dbs("errs");
    ok(&["generate", "--to", &src, "--rows", "5", "--dim", "4"]);
    let state = tempdir();
    let sr = state.path().to_str().unwrap();
    let dst = with_db(&target_base(), "errs_dst");
    one_clear_line(&vmig(&["migrate", "--from", "postgresql://postgres:s3cret@127.0.0.1:1/x", "--to", &dst, "--state-root", sr]), "cannot connect");
    let wrong = src.replace("postgres:postgres@", "postgres:s3cret@");
    one_clear_line(&vmig(&["migrate", "--from", &wrong, "--to", &dst, "--state-root", sr]), "password authentication failed");
    one_clear_line(&vmig(&["migrate", "--from", &src, "--to", &dst, "--table", "nosuch", "--state-root", sr]), "does not exist");
}

#[test]
fn pgvector_is_created_when_missing_and_a_role_that_may_not_gets_one_clear_line() {
    let (src, _) = dbs("pgvec");
    ok(&["generate", "--to", &src, "--rows", "60", "--dim", "8"]);
    let state = tempdir();
    let sr = state.path().to_str().unwrap();
    // A superuser (as FastGPT's own start-up does): created, said once.
    let novector = fresh_db(&target_base(), "pgvec_novec", false);
    let out = ok(&["migrate", "--from", &src, "--to", &novector, "--state-root", sr]);
    assert_eq!(stderr(&out).matches("created extension vector").count(), 1, "{}", stderr(&out));
    assert_eq!(assert_same_rows(&src, "modeldata", &novector, "modeldata"), 60);
    // The owner of a database who is no superuser may not create pgvector (it is not a trusted extension).
    exec(&target_base(), "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'vmig_limited') THEN CREATE ROLE vmig_limited LOGIN PASSWORD 'limitedpw'; END IF; END $$");
    let limited = fresh_db(&target_base(), "pgvec_limited", false);
    exec(&target_base(), "ALTER DATABASE pgvec_limited OWNER TO vmig_limited");
    let as_limited = limited.replace("postgres:postgres@", "vmig_limited:limitedpw@");
    let out = vmig(&["generate", "--to", &as_limited, "--rows", "5", "--dim", "4"]);
    one_clear_line(&out, "may not create it");
    assert!(!stderr(&out).contains("limitedpw"), "secret leaked: {}", stderr(&out));
    let st = tempdir();
    let out = vmig(&["migrate", "--from", &src, "--to", &as_limited, "--state-root", st.path().to_str().unwrap()]);
    one_clear_line(&out, "ask a superuser to run `CREATE EXTENSION vector`");
}
