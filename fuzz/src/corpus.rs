//! The campaign's corpora: LibAFL's in-memory corpus, mirrored to a directory as the entries
//! arrive.
//!
//! - The queue writes each entry as `<content hash>.json` (see [`store::corpus_name`]) unless
//!   a file with the same content is known to be in the directory, which makes writing
//!   idempotent: a restarted campaign, or two clients finding the same input, add no file.
//! - The artifacts corpus writes each solution as `crash-<kind>-<key hash>.json`, with the
//!   verdict in its description and `origin` filled, unless that file exists.
//!
//! Both write atomically, so killing a campaign at any moment leaves only whole files.

use std::cell::RefCell;
use std::collections::HashSet;
use std::path::PathBuf;

use libafl::Error;
use libafl::HasMetadata;
use libafl::corpus::{Corpus, CorpusId, InMemoryCorpus, Testcase};
use serde::{Deserialize, Serialize};
use vmm::engine::schedule::Origin;

use crate::feedback::FindingMetadata;
use crate::input::NmiInput;
use crate::store;

/// Where a [`DirCorpus`] writes, and how it names files.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Mirror {
    /// Keep entries in memory only (a campaign without a corpus directory).
    None,
    /// A corpus directory: `<content hash>.json`; the set holds the hashes already there.
    Queue(PathBuf, HashSet<u64>),
    /// The artifacts directory, and the origin recorded in each artifact.
    Artifacts(PathBuf, Origin),
}

/// An artifact this campaign wrote.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Artifact {
    /// Its path.
    pub path: PathBuf,
    /// [`vmm::Verdict::kind`].
    pub kind: String,
    /// The verdict as text.
    pub message: String,
}

/// An [`InMemoryCorpus`] that mirrors its entries to a directory (see the module docs).
#[derive(Debug, Serialize, Deserialize)]
pub struct DirCorpus {
    inner: InMemoryCorpus<NmiInput>,
    mirror: Mirror,
    /// Artifacts written by this corpus.
    pub written: Vec<Artifact>,
}

impl DirCorpus {
    /// A corpus mirrored as described by `mirror`.
    pub fn new(mirror: Mirror) -> Self {
        Self { inner: InMemoryCorpus::new(), mirror, written: Vec::new() }
    }

    /// Writes the entry's file, if this corpus mirrors to a directory.
    fn mirror(&mut self, testcase: &Testcase<NmiInput>) -> Result<(), Error> {
        let Some(NmiInput(schedule)) = testcase.input() else { return Ok(()) };
        match &mut self.mirror {
            Mirror::None => {}
            Mirror::Queue(dir, known) => {
                if known.insert(store::content_hash(schedule)) {
                    let path = dir.join(store::corpus_name(schedule));
                    store::write_atomic(&path, schedule.to_json().as_bytes())?;
                }
            }
            Mirror::Artifacts(dir, origin) => {
                let finding = testcase.metadata::<FindingMetadata>()?;
                let path = dir.join(store::artifact_name(&finding.kind, &finding.key));
                let mut artifact = schedule.clone();
                artifact.description = format!("found by nmifuzz run: {}", finding.message);
                artifact.origin = Some(origin.clone());
                if store::write_new_atomic(&path, artifact.to_json().as_bytes())? {
                    eprintln!("==nmifuzz== ERROR: {} [{}]", finding.message, finding.kind);
                    eprintln!(
                        "artifact_prefix='{}/'; Test unit written to {}",
                        dir.display(),
                        path.display()
                    );
                    self.written.push(Artifact {
                        path,
                        kind: finding.kind.clone(),
                        message: finding.message.clone(),
                    });
                }
            }
        }
        Ok(())
    }
}

impl Corpus<NmiInput> for DirCorpus {
    fn count(&self) -> usize {
        self.inner.count()
    }
    fn count_disabled(&self) -> usize {
        self.inner.count_disabled()
    }
    fn count_all(&self) -> usize {
        self.inner.count_all()
    }
    fn add(&mut self, testcase: Testcase<NmiInput>) -> Result<CorpusId, Error> {
        self.mirror(&testcase)?;
        self.inner.add(testcase)
    }
    /// Disabled entries are inputs that were not interesting: kept in memory, not written.
    fn add_disabled(&mut self, testcase: Testcase<NmiInput>) -> Result<CorpusId, Error> {
        self.inner.add_disabled(testcase)
    }
    fn replace(
        &mut self,
        id: CorpusId,
        testcase: Testcase<NmiInput>,
    ) -> Result<Testcase<NmiInput>, Error> {
        self.mirror(&testcase)?;
        self.inner.replace(id, testcase)
    }
    /// Removes the entry from memory; its file stays (nothing on disk is deleted).
    fn remove(&mut self, id: CorpusId) -> Result<Testcase<NmiInput>, Error> {
        self.inner.remove(id)
    }
    fn get(&self, id: CorpusId) -> Result<&RefCell<Testcase<NmiInput>>, Error> {
        self.inner.get(id)
    }
    fn get_from_all(&self, id: CorpusId) -> Result<&RefCell<Testcase<NmiInput>>, Error> {
        self.inner.get_from_all(id)
    }
    fn current(&self) -> &Option<CorpusId> {
        self.inner.current()
    }
    fn current_mut(&mut self) -> &mut Option<CorpusId> {
        self.inner.current_mut()
    }
    fn next(&self, id: CorpusId) -> Option<CorpusId> {
        self.inner.next(id)
    }
    fn peek_free_id(&self) -> CorpusId {
        self.inner.peek_free_id()
    }
    fn prev(&self, id: CorpusId) -> Option<CorpusId> {
        self.inner.prev(id)
    }
    fn first(&self) -> Option<CorpusId> {
        self.inner.first()
    }
    fn last(&self) -> Option<CorpusId> {
        self.inner.last()
    }
    fn nth_from_all(&self, nth: usize) -> CorpusId {
        self.inner.nth_from_all(nth)
    }
    fn load_input_into(&self, testcase: &mut Testcase<NmiInput>) -> Result<(), Error> {
        self.inner.load_input_into(testcase)
    }
    fn store_input_from(&self, testcase: &Testcase<NmiInput>) -> Result<(), Error> {
        self.inner.store_input_from(testcase)
    }
}
