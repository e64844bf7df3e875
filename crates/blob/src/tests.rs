use super::*;

fn open(budget: u64) -> (tempfile::TempDir, Blobs) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("db")).expect("store");
    let blobs = Blobs::open(dir.path(), store, budget).expect("blobs");
    (dir, blobs)
}

fn sha_of(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn content(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 % 251) as u8).collect()
}

#[test]
fn an_ingested_file_is_named_by_its_hash_and_read_back() {
    let (dir, blobs) = open(0);
    let data = content(3 * CHUNK + 17);
    let src = dir.path().join("in.bin");
    std::fs::write(&src, &data).expect("write");
    let f = blobs.ingest(&src, "reads.fq", false).expect("ingest");
    assert_eq!(f.sha256, sha_of(&data));
    assert_eq!(f.size, data.len() as u64);
    assert!(src.exists(), "a copied file stays where it was");
    assert!(blobs.holds(&f));
    let mut back = Vec::new();
    blobs
        .open_read(&f.sha256, 0)
        .expect("read")
        .read_to_end(&mut back)
        .expect("read");
    assert_eq!(back, data);
    let mut tail = Vec::new();
    blobs
        .open_read(&f.sha256, 10)
        .expect("read")
        .read_to_end(&mut tail)
        .expect("read");
    assert_eq!(tail, data[10..]);
    // Taking a file moves it; the same content is stored once.
    let again = dir.path().join("again.bin");
    std::fs::write(&again, &data).expect("write");
    let g = blobs.ingest(&again, "other", true).expect("ingest");
    assert_eq!(g.sha256, f.sha256);
    assert_eq!(blobs.used(), data.len() as u64);
}

#[test]
fn a_transfer_resumes_from_what_was_written_and_checks_the_hash() {
    let (_dir, blobs) = open(0);
    let data = content(2 * CHUNK + 5);
    let f = FileRef::new(sha_of(&data), data.len() as u64, "x".into()).expect("ref");
    let mut w = blobs.receive(&f).expect("receive");
    w.write(&data[..CHUNK + 3]).expect("write");
    drop(w); // the transfer broke
    assert_eq!(blobs.committed(&f.sha256), (CHUNK + 3) as u64);
    let mut w = blobs.receive(&f).expect("resume");
    assert_eq!(w.offset(), (CHUNK + 3) as u64);
    w.write(&data[CHUNK + 3..]).expect("write");
    assert!(w.is_complete());
    let got = w.finish().expect("finish");
    assert!(blobs.holds(&got));
    assert_eq!(blobs.committed(&f.sha256), data.len() as u64);
}

#[test]
fn wrong_content_and_extra_bytes_leave_nothing() {
    let (_dir, blobs) = open(0);
    let data = content(1000);
    let f = FileRef::new(sha_of(&data), 1000, "x".into()).expect("ref");
    let mut w = blobs.receive(&f).expect("receive");
    let mut bad = data.clone();
    bad[500] ^= 1;
    w.write(&bad).expect("write");
    let e = w.finish().expect_err("mismatch");
    assert!(matches!(e, BlobError::HashMismatch { .. }), "{e}");
    assert!(!blobs.holds(&f));
    assert_eq!(blobs.committed(&f.sha256), 0, "the partial is gone");
    let mut w = blobs.receive(&f).expect("receive");
    let e = w.write(&content(1001)).expect_err("too long");
    assert!(matches!(e, BlobError::TooLong { .. }), "{e}");
    assert_eq!(blobs.committed(&f.sha256), 0);
    assert_eq!(blobs.used(), 0);
}

#[test]
fn the_budget_refuses_what_would_not_fit() {
    let (dir, blobs) = open(1500);
    let f = FileRef::new("ab".repeat(32), 2000, "big".into()).expect("ref");
    let e = blobs.receive(&f).expect_err("over budget");
    assert!(e.to_string().contains("--blob-disk-bytes"), "{e}");
    let src = dir.path().join("small");
    std::fs::write(&src, content(1000)).expect("write");
    blobs.ingest(&src, "small", false).expect("fits");
    std::fs::write(&src, content(999)).expect("write");
    assert!(matches!(
        blobs.ingest(&src, "small2", false),
        Err(BlobError::Budget { .. })
    ));
}

#[test]
fn grants_name_a_blob_and_a_node() {
    let (_dir, blobs) = open(0);
    let mut b = Batch::default();
    Blobs::grant(&mut b, &"ab".repeat(32), "node-a");
    blobs.inner.store.write(b).expect("write");
    assert!(blobs.granted(&"ab".repeat(32), "node-a").expect("read"));
    assert!(!blobs.granted(&"ab".repeat(32), "node-b").expect("read"));
    assert!(!blobs.granted(&"cd".repeat(32), "node-a").expect("read"));
}

#[test]
fn a_sweep_keeps_live_files_and_deletes_the_rest_by_the_rules() {
    let (dir, blobs) = open(0);
    let mut refs = Vec::new();
    for i in 0..3 {
        let p = dir.path().join(format!("f{i}"));
        std::fs::write(&p, content(1000 + i)).expect("write");
        refs.push(blobs.ingest(&p, "f", false).expect("ingest"));
    }
    let keep: std::collections::HashSet<String> = [refs[0].sha256.clone()].into();
    let now = caroni_types::now_ms();
    let rules = SweepRules {
        retention_ms: 60_000,
        cache_bytes: 0,
        min_age_ms: 0,
    };
    // Within the retention nothing goes.
    assert_eq!(blobs.sweep(&keep, now, rules).expect("sweep").blobs, 0);
    // Past it, what nothing refers to goes, with its grant.
    let mut b = Batch::default();
    Blobs::grant(&mut b, &refs[1].sha256, "peer");
    blobs.inner.store.write(b).expect("grant");
    let later = now + 120_000;
    let swept = blobs.sweep(&keep, later, rules).expect("sweep");
    assert_eq!(swept.blobs, 2);
    assert!(blobs.holds(&refs[0]), "a live file is kept");
    assert!(!blobs.holds(&refs[1]) && !blobs.holds(&refs[2]));
    assert!(!blobs.granted(&refs[1].sha256, "peer").expect("read"));
    assert_eq!(blobs.used(), refs[0].size);
}

#[test]
fn a_full_cache_evicts_the_least_recently_used_first() {
    let (dir, blobs) = open(0);
    let mut refs = Vec::new();
    for i in 0..3 {
        let p = dir.path().join(format!("f{i}"));
        std::fs::write(&p, content(1000 + i)).expect("write");
        refs.push(blobs.ingest(&p, "f", false).expect("ingest"));
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    blobs.touch(&refs[0].sha256);
    let rules = SweepRules {
        retention_ms: u64::MAX,
        cache_bytes: 2100,
        min_age_ms: 0,
    };
    let swept = blobs
        .sweep(&Default::default(), caroni_types::now_ms() + 10, rules)
        .expect("sweep");
    assert_eq!(swept.blobs, 1);
    assert!(!blobs.holds(&refs[1]), "the least recently used goes first");
    assert!(blobs.holds(&refs[0]) && blobs.holds(&refs[2]));
}
