//! Replays every committed fuzz input (`fuzz/corpus/<target>/*`: the minimized corpora, the
//! seeds, and every input that once crashed a target) through the harness functions, so that
//! `cargo test` catches a regression without a fuzzing build.

use std::path::Path;

#[test]
fn every_corpus_replays_without_a_crash() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (target, run) in meridian_fuzz::TARGETS {
        let dir = corpus.join(target);
        let entries = std::fs::read_dir(&dir)
            .unwrap_or_else(|error| panic!("cannot read {}: {error}", dir.display()));
        let mut files: Vec<_> = entries
            .map(|entry| entry.expect("a directory entry").path())
            .filter(|path| path.is_file())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "{} holds no input", dir.display());
        for file in &files {
            let bytes = std::fs::read(file).expect("a corpus file");
            // A panic names the file: the input to reproduce it with.
            let outcome = std::panic::catch_unwind(|| run(&bytes));
            assert!(outcome.is_ok(), "{target} crashes on {}", file.display());
        }
        println!("{target}: replayed {} inputs", files.len());
    }
}

#[test]
fn every_seed_runs_and_is_in_its_corpus() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (target, run) in meridian_fuzz::TARGETS {
        let seeds = meridian_fuzz::seeds::seeds(target);
        assert!(!seeds.is_empty(), "{target} has no seeds");
        for (name, bytes) in &seeds {
            run(bytes);
            let path = corpus.join(target).join(name);
            let committed = std::fs::read(&path).unwrap_or_default();
            assert!(
                committed == *bytes,
                "{} is missing or stale: run `cargo run -p meridian-fuzz --example seed_corpus`",
                path.display()
            );
        }
    }
}

#[test]
fn empty_and_garbage_inputs_are_refused_quietly() {
    for (_, run) in meridian_fuzz::TARGETS {
        for input in [
            &b""[..],
            b"\0",
            b"\xff\xff\xff\xff",
            b"\n\n---\n[",
            b"GET / HTTP/1.1\r\n",
        ] {
            run(input);
        }
    }
}
