//! `vmig verify` judges many other tests, so it is tested on its own here:
//! each backend (PostgreSQL, seekdb, Milvus, a staging area) as the source
//! and as the target, against a PostgreSQL table. An untouched copy passes.
//! Then one copy gets every damage at once, each at its own id, made with
//! the databases' own clients (never vmig): verify must exit 1 and name
//! each id, in its chunk's line, under the right heading.
mod common;

use common::milvus_db::{MRow, fresh_milvus_db, milvus_delete, milvus_insert_copy, milvus_rows, milvus_upsert};
use common::*;

const ROWS: &str = "120";
const CHUNK: &str = "40";

/// One way a copy can be wrong.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Damage {
    /// One bit of one float: the lowest mantissa bit (seekdb too: vmig
    /// reads its stored floats as bits).
    FlippedBit,
    ChangedScalar,
    /// NULL where the other side has '' (SQL sides; Milvus has no NULL).
    NullForEmpty,
    MissingRow,
    ExtraRow,
    /// The same id twice (Milvus only: SQL keys are unique).
    SecondCopy,
    ChangedKey,
}

const SQL_DAMAGES: &[Damage] = &[Damage::FlippedBit, Damage::ChangedScalar, Damage::NullForEmpty, Damage::MissingRow, Damage::ExtraRow, Damage::ChangedKey];
const MILVUS_DAMAGES: &[Damage] = &[Damage::FlippedBit, Damage::ChangedScalar, Damage::MissingRow, Damage::ExtraRow, Damage::SecondCopy, Damage::ChangedKey];

/// The reference table: 120 rows in 3 chunks, `collection_id` nullable;
/// one id per damage, spread over the chunks, each with id + 1 free (for
/// the extra row and the changed key) and its `collection_id` '' (so NULL
/// vs '' can be made on a copy).
fn reference(name: &str, damages: &[Damage]) -> (String, Vec<(Damage, i64)>) {
    let src = fresh_db(&source_base(), &format!("{name}_ref"), true);
    ok(&["generate", "--to", &src, "--rows", ROWS, "--dim", "8"]);
    let free: Vec<i64> = rows(&src, "modeldata").iter().map(|r| r.id).collect();
    let candidates: Vec<i64> = free.iter().copied().filter(|id| !free.contains(&(id + 1))).collect();
    let step = candidates.len() / (damages.len() + 1);
    let picks: Vec<(Damage, i64)> = damages.iter().enumerate().map(|(i, d)| (*d, candidates[(i + 1) * step])).collect();
    let ids: Vec<String> = picks.iter().map(|(_, k)| k.to_string()).collect();
    exec(&src, &format!("ALTER TABLE modeldata ALTER COLUMN collection_id DROP NOT NULL; UPDATE modeldata SET collection_id = '' WHERE id IN ({})", ids.join(",")));
    (src, picks)
}

fn copy(from: &str, to: &str) {
    let state = tempdir();
    ok(&["migrate", "--from", from, "--to", to, "--chunk-rows", CHUNK, "--quiet", "--state-root", state.path().to_str().unwrap()]);
}

fn verify(from: &str, to: &str) -> (Option<i32>, String) {
    let out = vmig(&["verify", "--from", from, "--to", to, "--chunk-rows", CHUNK]);
    (out.status.code(), format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out)))
}

fn assert_equal(from: &str, to: &str, what: &str) {
    let (code, said) = verify(from, to);
    assert_eq!(code, Some(0), "{what}: an untouched copy did not pass\n{said}");
}

/// The ids verify's chunk lines list under `heading` ("missing ids", "extra
/// ids", "different ids", "duplicate copies of ids"), or, for "the source
/// holds", its note on a source's second copies.
fn listed(said: &str, heading: &str) -> Vec<i64> {
    let mut ids = Vec::new();
    let ids_in = |part: &str| -> Vec<i64> {
        let inner = part.split('[').nth(1).unwrap_or("").split(']').next().unwrap();
        inner.split(", ").filter(|x| !x.is_empty()).map(|x| x.parse::<i64>().unwrap()).collect()
    };
    for line in said.lines() {
        if heading == "the source holds" {
            if line.starts_with("note: the source holds") {
                ids.extend(ids_in(line));
            }
            continue;
        }
        if !line.starts_with("chunk ") {
            continue;
        }
        for part in line.split("; ").filter(|p| p.starts_with(heading) || (heading == "duplicate copies of ids" && p.contains(heading))) {
            ids.extend(ids_in(part));
        }
    }
    ids
}

/// Where a damage must be named: (heading, id), with the damaged copy as
/// the target or as the source.
fn expected(d: Damage, k: i64, copy_is_target: bool) -> Vec<(&'static str, i64)> {
    let (lost, gained) = if copy_is_target { ("missing ids", "extra ids") } else { ("extra ids", "missing ids") };
    match d {
        Damage::FlippedBit | Damage::ChangedScalar | Damage::NullForEmpty => vec![("different ids", k)],
        Damage::MissingRow => vec![(lost, k)],
        Damage::ExtraRow => vec![(gained, k + 1)],
        Damage::ChangedKey => vec![(lost, k), (gained, k + 1)],
        Damage::SecondCopy => vec![(if copy_is_target { "duplicate copies of ids" } else { "the source holds" }, k)],
    }
}

/// verify fails both ways and names every damaged id under its heading.
fn assert_all_caught(reference: &str, copy_url: &str, picks: &[(Damage, i64)], what: &str) {
    for copy_is_target in [true, false] {
        let (from, to) = if copy_is_target { (reference, copy_url) } else { (copy_url, reference) };
        let (code, said) = verify(from, to);
        let side = if copy_is_target { "target" } else { "source" };
        assert_eq!(code, Some(1), "{what} as the {side}: verify did not fail\n{said}");
        for &(d, k) in picks {
            for (heading, id) in expected(d, k, copy_is_target) {
                assert!(listed(&said, heading).contains(&id), "{what} as the {side}: {d:?} at {k}: id {id} not under {heading:?}\n{said}");
            }
        }
    }
}

/// A vector literal that round-trips every float32 exactly.
fn literal(bits: &[u32]) -> String {
    format!("[{}]", bits.iter().map(|b| format!("{:?}", f32::from_bits(*b))).collect::<Vec<_>>().join(","))
}

fn flipped(bits: &[u32], bit: u32) -> Vec<u32> {
    let mut v = bits.to_vec();
    v[3] ^= 1 << bit;
    v
}

/// The SQL statement that damages a FastGPT table (same syntax on PostgreSQL and seekdb).
fn sql_damage(d: Damage, k: i64, vector_bits: &[u32], bit: u32) -> String {
    let cols = "vector, team_id, dataset_id, collection_id, createtime";
    match d {
        Damage::FlippedBit => format!("UPDATE modeldata SET vector = '{}' WHERE id = {k}", literal(&flipped(vector_bits, bit))),
        Damage::ChangedScalar => format!("UPDATE modeldata SET team_id = 'tampered' WHERE id = {k}"),
        Damage::NullForEmpty => format!("UPDATE modeldata SET collection_id = NULL WHERE id = {k}"),
        Damage::MissingRow => format!("DELETE FROM modeldata WHERE id = {k}"),
        Damage::ExtraRow => format!("INSERT INTO modeldata (id, {cols}) SELECT id + 1, {cols} FROM modeldata WHERE id = {k}"),
        Damage::ChangedKey => format!("UPDATE modeldata SET id = id + 1 WHERE id = {k}"),
        Damage::SecondCopy => unreachable!("SQL keys are unique"),
    }
}

fn vector_of(url: &str, k: i64) -> Vec<u32> {
    rows(url, "modeldata").into_iter().find(|r| r.id == k).unwrap().vector_bits
}

#[test]
fn verify_names_each_damage_on_postgresql_either_side() {
    let (reference, picks) = reference("vm_pg", SQL_DAMAGES);
    let copy_url = fresh_db(&target_base(), "vm_pg_copy", true);
    copy(&reference, &copy_url);
    assert_equal(&reference, &copy_url, "PostgreSQL target");
    assert_equal(&copy_url, &reference, "PostgreSQL source");
    for &(d, k) in &picks {
        exec(&copy_url, &sql_damage(d, k, &vector_of(&reference, k), 0));
    }
    assert_all_caught(&reference, &copy_url, &picks, "damaged PostgreSQL");
}

#[test]
fn verify_names_each_damage_on_seekdb_either_side() {
    let (reference, picks) = reference("vm_ob", SQL_DAMAGES);
    let copy_url = fresh_ob_db("vm_ob_copy");
    copy(&reference, &copy_url);
    assert_equal(&reference, &copy_url, "seekdb target");
    assert_equal(&copy_url, &reference, "seekdb source");
    for &(d, k) in &picks {
        ob_exec(&copy_url, &sql_damage(d, k, &vector_of(&reference, k), 0));
    }
    assert_all_caught(&reference, &copy_url, &picks, "damaged seekdb");
}

fn milvus_damage(url: &str, d: Damage, row: &MRow) {
    let mut r = row.clone();
    match d {
        Damage::FlippedBit => {
            r.vector_bits = flipped(&row.vector_bits, 0);
            milvus_upsert(url, "modeldata", &r);
        }
        Damage::ChangedScalar => {
            r.team_id = "tampered".into();
            milvus_upsert(url, "modeldata", &r);
        }
        Damage::MissingRow => milvus_delete(url, "modeldata", row.id),
        Damage::ExtraRow => {
            r.id += 1;
            milvus_insert_copy(url, "modeldata", &r);
        }
        Damage::SecondCopy => milvus_insert_copy(url, "modeldata", row),
        Damage::ChangedKey => {
            milvus_delete(url, "modeldata", row.id);
            r.id += 1;
            milvus_insert_copy(url, "modeldata", &r);
        }
        Damage::NullForEmpty => unreachable!("Milvus 2.3 has no NULL"),
    }
}

#[test]
fn verify_names_each_damage_on_milvus_either_side() {
    let (reference, picks) = reference("vm_mv", MILVUS_DAMAGES);
    let copy_url = fresh_milvus_db("vm_mv_copy");
    copy(&reference, &copy_url);
    assert_equal(&reference, &copy_url, "Milvus target");
    assert_equal(&copy_url, &reference, "Milvus source");
    let stored = milvus_rows(&copy_url, "modeldata");
    for &(d, k) in &picks {
        milvus_damage(&copy_url, d, stored.iter().find(|r| r.id == k).unwrap());
    }
    assert_all_caught(&reference, &copy_url, &picks, "damaged Milvus");
}

/// A staging area compared with its source, either way: untouched it
/// passes; a chunk file rewritten after its commit marker (a valid Parquet
/// file, one value changed) fails and names the chunk.
#[test]
fn verify_catches_a_staged_chunk_changed_after_its_marker() {
    let (reference, picks) = reference("vm_st", &[Damage::ChangedScalar]);
    let k = picks[0].1;
    let dir = tempdir();
    let st = dir.path().join("st");
    let st_s = st.to_str().unwrap();
    ok(&["export", "--from", &reference, "--staging", st_s, "--chunk-rows", CHUNK, "--quiet"]);
    assert_equal(&reference, st_s, "staging target");
    assert_equal(st_s, &reference, "staging source");
    // The chunk file holding k, rewritten by pyarrow with k's team_id changed.

    let python = std::env::var("VMIG_TEST_PYTHON").expect("VMIG_TEST_PYTHON names the python with pyarrow");
    let script = r#"
import glob, sys, pyarrow as pa, pyarrow.parquet as pq, pyarrow.compute as pc
st, k = sys.argv[1], int(sys.argv[2])
for f in sorted(glob.glob(st + "/**/*.parquet", recursive=True)):
    t = pq.read_table(f)
    if "id" not in t.column_names or not pc.any(pc.equal(t["id"], k)).as_py():
        continue
    team = pc.if_else(pc.equal(t["id"], k), pa.scalar("tampered"), t["team_id"])
    t = t.set_column(t.column_names.index("team_id"), "team_id", team.cast(t.schema.field("team_id").type))
    pq.write_table(t, f, compression="zstd")
    print(f)
    break
else:
    sys.exit("no chunk file holds id %d" % k)
"#;
    let out = std::process::Command::new(python).args(["-c", script, st_s, &k.to_string()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    for (from, to) in [(reference.as_str(), st_s), (st_s, reference.as_str())] {
        let (code, said) = verify(from, to);
        assert_eq!(code, Some(1), "a changed chunk file passed verify\n{said}");
        assert!(said.contains("chunk 000001") && said.contains("altered"), "the altered chunk is not named\n{said}");
    }

    // One byte flipped inside a chunk file, its size unchanged: the marker's sha256 catches it.
    let st2 = dir.path().join("st2");
    let st2_s = st2.to_str().unwrap();
    ok(&["export", "--from", &reference, "--staging", st2_s, "--chunk-rows", CHUNK, "--quiet"]);
    let mut files = Vec::new();
    let mut todo = vec![st2.clone()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() { todo.push(p) } else if p.extension().is_some_and(|x| x == "parquet") { files.push(p) }
        }
    }
    files.sort();
    let victim = &files[files.len() / 2];
    let mut bytes = std::fs::read(victim).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x10;
    std::fs::write(victim, &bytes).unwrap();
    for (from, to) in [(reference.as_str(), st2_s), (st2_s, reference.as_str())] {
        let (code, said) = verify(from, to);
        assert_eq!(code, Some(1), "a chunk file with a flipped byte passed verify\n{said}");
        assert!(said.contains("chunk 0000") && (said.contains("sha256") || said.contains("altered")), "the altered chunk is not named\n{said}");
    }
}
