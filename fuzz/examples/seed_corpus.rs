//! Writes the seed inputs of every fuzz target into `fuzz/corpus/<target>/seed-*`, the starting
//! shapes for fuzzing (`cargo run -p meridian-fuzz --example seed_corpus`). Existing files are
//! overwritten; nothing else in the corpora is touched.

use std::path::Path;

fn main() -> std::io::Result<()> {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (target, _) in meridian_fuzz::TARGETS {
        let dir = corpus.join(target);
        std::fs::create_dir_all(&dir)?;
        let seeds = meridian_fuzz::seeds::seeds(target);
        for (name, bytes) in &seeds {
            std::fs::write(dir.join(name), bytes)?;
        }
        println!("{target}: {} seeds in {}", seeds.len(), dir.display());
    }
    Ok(())
}
