//! `nmifuzz cmin`: corpus minimization by greedy set cover over the coverage maps.
//!
//! Every entry is run once with the campaign's coverage map; its edges are the map indices it
//! hits. Then, until every edge of the corpus is covered, the entry covering the most edges
//! not yet covered is kept; ties go to the smaller entry (fewer injections, then the shorter
//! JSON, then the file name, so the result is deterministic). The greedy cover is within a
//! factor ln(edges) of the smallest, which is plenty for a corpus.
//!
//! Nothing is deleted unless `--in-place` is given; `--output DIR` copies the kept entries.

use std::collections::HashSet;
use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::campaign::MAP_SIZE;
use crate::options::CminArgs;
use crate::progress::Progress;
use crate::store;
use crate::target::Target;

/// One corpus entry and the edges it covers.
pub struct Entry {
    /// Its file.
    pub path: PathBuf,
    /// Its size key: injections, JSON length.
    pub size: (usize, usize),
    /// Map indices it hits.
    pub edges: HashSet<usize>,
}

/// The indices of `entries` a greedy set cover keeps, in the order it picks them.
pub fn greedy_cover(entries: &[Entry]) -> Vec<usize> {
    let mut uncovered: HashSet<usize> =
        entries.iter().flat_map(|e| e.edges.iter().copied()).collect();
    let mut kept = Vec::new();
    while !uncovered.is_empty() {
        let best = entries
            .iter()
            .enumerate()
            .filter(|(i, _)| !kept.contains(i))
            .map(|(i, e)| (e.edges.intersection(&uncovered).count(), i))
            .filter(|(gain, _)| *gain > 0)
            // Most new edges; then the smaller entry, then the earlier file name.
            .max_by(|(ga, a), (gb, b)| {
                ga.cmp(gb)
                    .then_with(|| entries[*b].size.cmp(&entries[*a].size))
                    .then_with(|| entries[*b].path.cmp(&entries[*a].path))
            });
        let Some((_, i)) = best else { break };
        for edge in &entries[i].edges {
            uncovered.remove(edge);
        }
        kept.push(i);
    }
    kept
}

/// `nmifuzz cmin`.
pub fn run(args: &CminArgs) -> Result<()> {
    let loaded = store::load_dir(&args.corpus)?;
    for warning in &loaded.warnings {
        eprintln!("WARNING: {warning}");
    }
    let mut target = Target::new()?;
    let options = crate::target::run_options(args.timeout_ms);
    let mut map = vec![0u8; MAP_SIZE];
    let mut entries = Vec::new();
    let progress = Progress::new(loaded.entries.len() as u64, "entries", true);
    for (path, schedule) in &loaded.entries {
        map.fill(0);
        target.execute(schedule, &options, &mut map)?;
        entries.push(Entry {
            path: path.clone(),
            size: (schedule.injections.len(), schedule.to_json().len()),
            edges: map.iter().enumerate().filter(|(_, hits)| **hits > 0).map(|(i, _)| i).collect(),
        });
        progress.inc(1);
    }
    progress.finish();
    let kept = greedy_cover(&entries);
    let total_edges: HashSet<usize> =
        entries.iter().flat_map(|e| e.edges.iter().copied()).collect();
    let removed: Vec<&Entry> =
        entries.iter().enumerate().filter(|(i, _)| !kept.contains(i)).map(|(_, e)| e).collect();
    println!(
        "cmin: kept {} of {} entries, removed {}, covering all {} edges",
        kept.len(),
        entries.len(),
        removed.len(),
        total_edges.len()
    );
    if let Some(output) = &args.output {
        store::prepare_dir(output)?;
        for &i in &kept {
            let source = &entries[i].path;
            let bytes = std::fs::read(source)
                .with_context(|| format!("cannot read {}", source.display()))?;
            let name = source.file_name().expect("a file");
            store::write_atomic(&output.join(name), &bytes)
                .with_context(|| format!("cannot write into {}", output.display()))?;
        }
        println!(
            "cmin: copied the {} kept entries to {}; {} is unchanged",
            kept.len(),
            output.display(),
            args.corpus.display()
        );
    } else if args.in_place {
        for entry in &removed {
            std::fs::remove_file(&entry.path)
                .with_context(|| format!("cannot remove {}", entry.path.display()))?;
        }
        println!("cmin: removed {} entries from {}", removed.len(), args.corpus.display());
    } else {
        for entry in &removed {
            println!("  would remove {}", entry.path.display());
        }
        println!(
            "cmin: nothing changed; pass --output DIR to copy the kept entries or --in-place to delete the others"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, injections: usize, edges: &[usize]) -> Entry {
        Entry { path: name.into(), size: (injections, 10), edges: edges.iter().copied().collect() }
    }

    #[test]
    fn greedy_cover_keeps_every_edge_with_few_entries() {
        let entries = vec![
            entry("a", 1, &[1, 2]),
            entry("b", 1, &[3]),
            entry("c", 3, &[1, 2, 3, 4]),
            entry("d", 1, &[]),
            entry("e", 1, &[4]),
        ];
        assert_eq!(greedy_cover(&entries), vec![2]);
    }

    #[test]
    fn ties_go_to_the_smaller_entry_then_the_name() {
        let entries =
            vec![entry("big", 4, &[1, 2]), entry("small", 1, &[1, 2]), entry("also", 1, &[1, 2])];
        assert_eq!(greedy_cover(&entries), vec![2]);
        let entries = vec![entry("x", 2, &[1]), entry("y", 1, &[1]), entry("z", 1, &[2])];
        assert_eq!(greedy_cover(&entries), vec![1, 2]);
    }

    #[test]
    fn an_empty_corpus_keeps_nothing() {
        assert!(greedy_cover(&[]).is_empty());
        assert!(greedy_cover(&[entry("a", 1, &[])]).is_empty());
    }
}
