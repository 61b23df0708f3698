//! Collection definitions: a collection's optional JSON Schema, who may
//! read and write it over HTTP, and its access tokens.
//!
//! Part of the document store ([`crate::Documents`]): every document read
//! or write first looks its collection up here (cached for
//! [`crate::DEFINITION_TTL`]), so an undefined collection is refused and a
//! schema is checked on every write. Definitions are records of
//! [`COLLECTIONS`] in the state store, shared by every Tron on it.
//!
//! Access ([`Access`]) is per collection and per direction: `public`
//! (anyone who reaches the ingress), `token` (a token of the collection,
//! made with [`crate::Documents::add_token`], or an operator token), or
//! `operator` (the Tron's read token to read, its admin token to write;
//! the default). Tokens are kept as SHA-256 digests only; the token itself
//! is shown once, when made.

use std::sync::Arc;
use std::time::Instant;

use funcatron_store::{Query, Record, Store, StoreError};
use jsonschema::Validator;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::{corrupt, records_of, DocError, Documents, DEFINITION_TTL};

/// The state store collection of definitions (key: the collection name).
pub const COLLECTIONS: &str = "doc_collections";

/// Most tokens one collection holds.
pub const MAX_TOKENS: usize = 32;

/// Who may read, or write, a collection over HTTP.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    /// Anyone.
    Public,
    /// A token of the collection, or an operator token.
    Token,
    /// An operator token only (the Tron's read token reads, its admin
    /// token writes).
    #[default]
    Operator,
}

/// What an operator defines for a collection.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Definition {
    /// The JSON Schema (draft 2020-12 unless it names another) every
    /// written document must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<Value>,
    /// Who may read it.
    #[serde(default)]
    pub read: Access,
    /// Who may write it.
    #[serde(default)]
    pub write: Access,
}

/// One access token of a collection, as kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Token {
    /// Names it (to revoke it); not secret.
    id: String,
    /// SHA-256 of the token, hex.
    sha256: String,
    /// Whether it may write (every token may read).
    write: bool,
}

/// A definition record's value.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    definition: Definition,
    #[serde(default)]
    tokens: Vec<Token>,
}

/// A collection as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CollectionView {
    /// Its name.
    pub name: String,
    /// Its definition.
    #[serde(flatten)]
    pub definition: Definition,
    /// Its tokens: id and whether it writes (never the token).
    pub tokens: Vec<Value>,
}

/// A defined collection, ready to check documents and tokens.
pub struct Collection {
    name: String,
    stored: Stored,
    validator: Option<Validator>,
}

impl std::fmt::Debug for Collection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Collection")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// A collection name: 1 to 64 of `a-z 0-9 _ -`, starting with a letter or
/// a digit.
pub fn check_name(name: &str) -> Result<(), DocError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(DocError::Invalid(format!(
            "collection name {name:?}: use 1 to 64 of a-z 0-9 _ -, starting with a letter or digit"
        )))
    }
}

fn compile(schema: Option<&Value>) -> Result<Option<Validator>, DocError> {
    schema
        .map(|s| {
            jsonschema::validator_for(s)
                .map_err(|e| DocError::Invalid(format!("the collection's schema: {e}")))
        })
        .transpose()
}

fn digest(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Collection {
    fn from_record(name: &str, r: &Record) -> Result<Self, DocError> {
        let stored: Stored =
            serde_json::from_slice(&r.value).map_err(|e| corrupt("a collection definition", e))?;
        let validator = compile(stored.definition.schema.as_ref())
            .map_err(|e| corrupt("a collection's schema", e))?;
        Ok(Collection {
            name: name.to_owned(),
            stored,
            validator,
        })
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its definition.
    pub fn definition(&self) -> &Definition {
        &self.stored.definition
    }

    /// How the API shows it.
    pub fn view(&self) -> CollectionView {
        CollectionView {
            name: self.name.clone(),
            definition: self.stored.definition.clone(),
            tokens: self
                .stored
                .tokens
                .iter()
                .map(|t| serde_json::json!({"id": t.id, "write": t.write}))
                .collect(),
        }
    }

    /// Check a document to be written: a JSON object of at most
    /// [`crate::MAX_DOCUMENT_BYTES`], matching the schema if there is one.
    pub fn check(&self, doc: &Value) -> Result<(), DocError> {
        if !doc.is_object() {
            return Err(DocError::Invalid(
                "a document is a JSON object ({...})".into(),
            ));
        }
        if let Some(v) = &self.validator {
            if !v.is_valid(doc) {
                let problems = v
                    .iter_errors(doc)
                    .take(20)
                    .map(|e| {
                        let at = e.instance_path().to_string();
                        format!("{}: {e}", if at.is_empty() { "/" } else { &at })
                    })
                    .collect();
                return Err(DocError::Schema(problems));
            }
        }
        Ok(())
    }

    /// Whether `token` is one of the collection's, with the right to
    /// write when `write`. Compared by digest, in constant time.
    pub fn token_allows(&self, token: &str, write: bool) -> bool {
        let given = digest(token);
        self.stored
            .tokens
            .iter()
            .any(|t| bool::from(t.sha256.as_bytes().ct_eq(given.as_bytes())) && (t.write || !write))
    }
}

impl Documents {
    /// The collection's definition (cached for [`DEFINITION_TTL`]).
    pub async fn collection(&self, name: &str) -> Result<Arc<Collection>, DocError> {
        check_name(name)?;
        if let Ok(cache) = self.definitions.lock() {
            if let Some((at, found)) = cache.get(name) {
                if at.elapsed() < DEFINITION_TTL {
                    return Ok(Arc::clone(found));
                }
            }
        }
        // Only definitions are cached: a collection defined anywhere is
        // usable at once.
        match self.store.get(COLLECTIONS, name).await? {
            Some(r) => {
                let found = Arc::new(Collection::from_record(name, &r)?);
                self.remember(name, Arc::clone(&found));
                Ok(found)
            }
            None => Err(DocError::UnknownCollection(name.to_owned())),
        }
    }

    fn remember(&self, name: &str, found: Arc<Collection>) {
        if let Ok(mut cache) = self.definitions.lock() {
            if cache.len() > 10_000 {
                cache.clear();
            }
            cache.insert(name.to_owned(), (Instant::now(), found));
        }
    }

    /// Define a collection, or change its definition (its documents and
    /// tokens are kept; a new schema applies to later writes only).
    pub async fn define(
        &self,
        name: &str,
        definition: Definition,
    ) -> Result<CollectionView, DocError> {
        check_name(name)?;
        compile(definition.schema.as_ref())?;
        let (view, ()) = self
            .update(name, true, |stored| {
                stored.definition = definition.clone();
                Ok(())
            })
            .await?;
        Ok(view)
    }

    /// Add an access token; the token (shown only now) and its id.
    pub async fn add_token(&self, name: &str, write: bool) -> Result<(String, String), DocError> {
        let token = format!("fst_{}", uuid::Uuid::new_v4().simple());
        let id = format!("t{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let sha256 = digest(&token);
        self.update(name, false, |stored| {
            if stored.tokens.len() >= MAX_TOKENS {
                return Err(DocError::Invalid(format!(
                    "a collection holds at most {MAX_TOKENS} tokens: revoke one first"
                )));
            }
            stored.tokens.push(Token {
                id: id.clone(),
                sha256: sha256.clone(),
                write,
            });
            Ok(())
        })
        .await?;
        Ok((token, id))
    }

    /// Revoke a token by its id; whether it was there.
    pub async fn revoke_token(&self, name: &str, id: &str) -> Result<bool, DocError> {
        let (_, found) = self
            .update(name, false, |stored| {
                let before = stored.tokens.len();
                stored.tokens.retain(|t| t.id != id);
                Ok(stored.tokens.len() != before)
            })
            .await?;
        Ok(found)
    }

    /// Read-modify-write a definition by compare-and-set (`create`: a
    /// missing one starts empty; else it is [`DocError::UnknownCollection`]).
    async fn update<T>(
        &self,
        name: &str,
        create: bool,
        change: impl Fn(&mut Stored) -> Result<T, DocError>,
    ) -> Result<(CollectionView, T), DocError> {
        check_name(name)?;
        for _ in 0..32 {
            let current = self.store.get(COLLECTIONS, name).await?;
            let mut stored = match &current {
                Some(r) => Collection::from_record(name, r)?.stored,
                None if create => Stored {
                    definition: Definition::default(),
                    tokens: Vec::new(),
                },
                None => return Err(DocError::UnknownCollection(name.to_owned())),
            };
            let outcome = change(&mut stored)?;
            let value = serde_json::to_vec(&stored)
                .map_err(|e| DocError::Invalid(format!("the definition: {e}")))?;
            let record = Record::new(COLLECTIONS, name).with_value(value);
            let written = match &current {
                Some(r) => self.store.replace(&record, r.revision).await,
                None => self.store.insert(&record).await,
            };
            match written {
                Ok(_) => {
                    let collection = Collection {
                        name: name.to_owned(),
                        validator: compile(stored.definition.schema.as_ref())?,
                        stored,
                    };
                    let view = collection.view();
                    self.remember(name, Arc::new(collection));
                    return Ok((view, outcome));
                }
                Err(StoreError::Conflict { .. } | StoreError::Exists { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Err(DocError::Busy)
    }

    /// Every defined collection, by name.
    pub async fn collections(&self) -> Result<Vec<CollectionView>, DocError> {
        let mut out = Vec::new();
        let mut after = None;
        loop {
            let mut q = Query::new(COLLECTIONS).limit(funcatron_store::MAX_LIST);
            q.after_key = after;
            let page = self.store.list(&q).await?;
            for r in &page {
                out.push(Collection::from_record(&r.key, r)?.view());
            }
            if page.len() < funcatron_store::MAX_LIST {
                return Ok(out);
            }
            after = page.last().map(|r| r.key.clone());
        }
    }

    /// Remove a collection's definition; refused while it holds documents.
    pub async fn drop_collection(&self, name: &str) -> Result<(), DocError> {
        let def = self.collection(name).await?;
        if self.count(name).await? > 0 {
            return Err(DocError::NotEmpty(name.to_owned()));
        }
        let records = records_of(name);
        let _ = self.store.delete(COLLECTIONS, &def.name).await?;
        // Tombstones go with it: a collection defined again starts afresh.
        loop {
            let page = self.store.list(&Query::new(&records).limit(500)).await?;
            for r in &page {
                self.store.delete(&records, &r.key).await?;
            }
            if page.len() < 500 {
                break;
            }
        }
        if let Ok(mut cache) = self.definitions.lock() {
            cache.remove(name);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for ok in ["orders", "a", "0-x_y", &"a".repeat(64)] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Orders",
            "_x",
            "-x",
            "a b",
            "a/b",
            "a:b",
            &"a".repeat(65),
        ] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn digests_are_hex_sha256() {
        assert_eq!(
            digest("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
