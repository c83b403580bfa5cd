//! Layer chains: an image whose manifest names a parent is a *layer* (an incremental
//! snapshot): its changed chunks are its own, the rest [`Chunk::Inherited`] from the
//! parent, which may be a layer too, down to a base with no parent.
//!
//! A chain is resolved once, when the image is opened ([`Chain::resolve`]): each parent is
//! read from the same store root, checked against the digest its child recorded (a parent
//! replaced since the layer was made is refused, not silently mixed in), and checked to have
//! the same geometry. [`Chain::flatten`] then folds the chain into one manifest — newest
//! layer wins per chunk, packs of every layer in one list — which is what the read path
//! serves: one table lookup per fault whatever the chain's depth (as e2b flattens each
//! generation's diff chain into one extent map), and what `merge` writes as a new image
//! without copying a byte of chunk data.

use std::collections::{HashMap, HashSet};

use crate::error::{ChainError, Error, Result};
use crate::hash::Digest;
use crate::manifest::{Chunk, Manifest, MAX_CHAIN_DEPTH};
use crate::store::Store;

/// A resolved chain: the layers from the top (the image opened) down to the base.
#[derive(Debug, Clone)]
pub struct Chain {
    layers: Vec<(String, Manifest)>,
}

impl Chain {
    /// Reads the parents of `top` (named `name` in `store`) down to the base, checking
    /// each link (see the module docs).
    pub async fn resolve(store: &Store, name: &str, top: Manifest) -> Result<Chain> {
        let mut layers = vec![(name.to_owned(), top)];
        let mut seen: HashSet<String> = HashSet::from([name.to_owned()]);
        loop {
            let (child_name, child) = layers.last().expect("the top is always there");
            let Some(parent) = child.parent().cloned() else {
                break;
            };
            let refuse = |source| Error::Chain {
                layer: format!("{}{child_name}", store.url()),
                source,
            };
            if layers.len() >= MAX_CHAIN_DEPTH {
                return Err(refuse(ChainError::TooDeep));
            }
            if !seen.insert(parent.name.clone()) {
                return Err(refuse(ChainError::Cycle(parent.name)));
            }
            let manifest = match store.manifest(&parent.name).await {
                Ok(m) => m,
                Err(Error::Store {
                    source: object_store::Error::NotFound { .. },
                    ..
                }) => {
                    return Err(refuse(ChainError::ParentMissing {
                        parent: parent.name,
                    }))
                }
                Err(e) => return Err(e),
            };
            let actual = manifest.digest();
            if actual != parent.digest {
                return Err(refuse(ChainError::ParentChanged {
                    parent: parent.name,
                    expected: parent.digest,
                    actual,
                }));
            }
            if manifest.geometry() != child.geometry() {
                return Err(refuse(ChainError::Geometry {
                    parent: parent.name,
                    layer: child.geometry(),
                    parent_geometry: manifest.geometry(),
                }));
            }
            layers.push((parent.name, manifest));
        }
        Ok(Chain { layers })
    }

    /// The layers, top first, base last (a plain image is a chain of one).
    pub fn layers(&self) -> &[(String, Manifest)] {
        &self.layers
    }

    /// Layers in the chain, the base included.
    pub fn depth(&self) -> usize {
        self.layers.len()
    }

    /// The top layer's manifest (the image opened).
    pub fn top(&self) -> &Manifest {
        &self.layers[0].1
    }

    /// The chain folded into one manifest with no parent: each chunk as the newest layer
    /// that has it, the packs of every layer in one list.
    pub fn flatten(&self) -> Manifest {
        let top = self.top();
        let mut chunks: Vec<Chunk> = top.chunks().to_vec();
        let mut packs: Vec<Digest> = Vec::new();
        let mut pack_index: HashMap<Digest, u32> = HashMap::new();
        let mut unresolved: Vec<usize> = Vec::new();
        for (layer, (_, m)) in self.layers.iter().enumerate() {
            let candidates: Box<dyn Iterator<Item = usize>> = if layer == 0 {
                Box::new(0..chunks.len())
            } else {
                Box::new(std::mem::take(&mut unresolved).into_iter())
            };
            for i in candidates {
                chunks[i] = match m.chunks()[i] {
                    Chunk::Inherited => {
                        unresolved.push(i);
                        continue;
                    }
                    Chunk::Zero => Chunk::Zero,
                    Chunk::Data {
                        digest,
                        pack,
                        offset,
                    } => {
                        let id = m.packs()[pack as usize];
                        let pack = *pack_index.entry(id).or_insert_with(|| {
                            packs.push(id);
                            (packs.len() - 1) as u32
                        });
                        Chunk::Data {
                            digest,
                            pack,
                            offset,
                        }
                    }
                };
            }
        }
        // The base has no inherited chunks (the decoder refuses them without a parent), so
        // nothing is left unresolved.
        debug_assert!(unresolved.is_empty());
        Manifest::new(top.geometry(), None, packs, chunks)
            .expect("a flattened valid chain is a valid manifest")
    }
}
