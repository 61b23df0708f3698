//! Where in a document's text something is: the line and column of a JSON
//! pointer, and located syntax errors.
//!
//! Bundle loading -> **error messages**. The loader works on
//! `serde_json::Value`s, which keep no positions; when it finds a problem
//! it knows the JSON pointer (`/paths/~1pets/get/operationId`). To name the
//! line and column too, the text is read again (YAML or JSON, the same
//! parser) with a deserializer that walks down the pointer and fails on
//! purpose at the node it reaches: `serde_yaml_ng` marks every error with
//! the position of the node being read. This only runs when there is an
//! error to report.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::BundleError;

/// The error the walk raises on purpose at its target.
const HERE: &str = "\u{1}funcatron-locate-here";

/// The unescaped tokens of a JSON pointer (`/a~1b/0` -> `a/b`, `0`).
pub(crate) fn pointer_tokens(pointer: &str) -> Vec<String> {
    if pointer.is_empty() {
        return Vec::new();
    }
    pointer
        .trim_start_matches('/')
        .split('/')
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect()
}

/// `token` escaped for a JSON pointer (`a/b` -> `a~1b`).
pub(crate) fn escape_token(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

/// The 1-based line and column of the node at `pointer` in `text`, or of
/// the deepest node on the way to it that exists; `None` when the text
/// does not parse.
pub(crate) fn locate(text: &str, pointer: &str) -> Option<(usize, usize)> {
    let tokens = pointer_tokens(pointer);
    let de = serde_yaml_ng::Deserializer::from_str(text);
    match (Seek { tokens: &tokens }).deserialize(de) {
        Ok(()) => None,
        Err(e) if e.to_string().contains(HERE) => {
            e.location().map(|l| (l.line(), l.column().max(1)))
        }
        Err(_) => None,
    }
}

/// Read the value at `pointer` in `text` as a `T`, so type errors carry
/// the line, column and field path; `Ok(None)` when nothing is there.
pub(crate) fn deserialize_at<T: de::DeserializeOwned>(
    text: &str,
    pointer: &str,
) -> Result<Option<T>, serde_yaml_ng::Error> {
    let tokens = pointer_tokens(pointer);
    let de = serde_yaml_ng::Deserializer::from_str(text);
    (Take::<T> {
        tokens: &tokens,
        _t: std::marker::PhantomData,
    })
    .deserialize(de)
}

/// A `serde_yaml_ng` error as a bundle error naming `path:line:column`.
pub(crate) fn yaml_error(path: &Path, what: &str, e: &serde_yaml_ng::Error) -> BundleError {
    let text = e.to_string();
    match e.location() {
        Some(l) => {
            let suffix = format!(" at line {} column {}", l.line(), l.column());
            let message = match text.find(&suffix) {
                Some(i) => format!("{}{}", &text[..i], &text[i + suffix.len()..]),
                None => text,
            };
            BundleError::Located {
                path: path.to_owned(),
                line: l.line(),
                column: l.column().max(1),
                message: format!("{what}{message}"),
            }
        }
        None => BundleError::invalid(path, format!("{what}{text}")),
    }
}

/// A semantic problem in a document: where (a JSON pointer into the
/// loaded document) and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Problem {
    /// JSON pointer into the document as loaded (external files under
    /// [`crate::refs::refs_pointer`]).
    pub pointer: String,
    /// What is wrong.
    pub message: String,
}

impl Problem {
    pub(crate) fn new(pointer: impl Into<String>, message: impl Into<String>) -> Problem {
        Problem {
            pointer: pointer.into(),
            message: message.into(),
        }
    }
}

/// One file a document was read from.
#[derive(Debug, Clone)]
pub(crate) struct Source {
    pub path: PathBuf,
    pub text: String,
}

/// The files a loaded document was made of, to say where a problem is.
#[derive(Debug, Clone)]
pub(crate) struct Sources {
    /// The bundle's document.
    pub main: Source,
    /// Files its `$ref`s brought in, by their key under
    /// [`crate::refs::REFS_KEY`] (their path in the bundle).
    pub files: BTreeMap<String, Source>,
    /// Where those files are in the document
    /// ([`crate::refs::refs_pointer`]); empty when none can be.
    pub refs_prefix: String,
}

impl Sources {
    /// A document that is one file.
    pub(crate) fn single(path: &Path, text: &str) -> Sources {
        Sources {
            main: Source {
                path: path.to_owned(),
                text: text.to_owned(),
            },
            files: BTreeMap::new(),
            refs_prefix: String::new(),
        }
    }

    /// `p` as an error naming the file it is in, its line and column where
    /// they can be found, and the JSON pointer within that file.
    pub(crate) fn error(&self, p: Problem) -> BundleError {
        let prefix = format!("{}/", self.refs_prefix);
        let inner = (!self.refs_prefix.is_empty())
            .then(|| p.pointer.strip_prefix(&prefix))
            .flatten();
        let (source, pointer) = match inner {
            Some(rest) => {
                let (key, inner) = match rest.find('/') {
                    Some(i) => (&rest[..i], &rest[i..]),
                    None => (rest, ""),
                };
                let key = key.replace("~1", "/").replace("~0", "~");
                match self.files.get(&key) {
                    Some(s) => (s, inner.to_owned()),
                    None => (&self.main, p.pointer.clone()),
                }
            }
            None => (&self.main, p.pointer.clone()),
        };
        let shown = if pointer.is_empty() { "/" } else { &pointer };
        let message = format!("{shown}: {}", p.message);
        match locate(&source.text, &pointer) {
            Some((line, column)) => BundleError::Located {
                path: source.path.clone(),
                line,
                column,
                message,
            },
            None => BundleError::invalid(&source.path, message),
        }
    }
}

/// Walks down `tokens`; fails with [`HERE`] at the node they lead to.
struct Seek<'p> {
    tokens: &'p [String],
}

/// Fails with [`HERE`] at whatever node it is asked to read.
struct Here;

impl<'de> Visitor<'de> for Here {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("anything")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Err(E::custom(HERE))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Err(E::custom(HERE))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Err(E::custom(HERE))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Err(E::custom(HERE))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Err(E::custom(HERE))
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Err(E::custom(HERE))
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Err(E::custom(HERE))
    }
    fn visit_some<D: Deserializer<'de>>(self, _: D) -> Result<(), D::Error> {
        Err(de::Error::custom(HERE))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(de::Error::custom(HERE))
    }
    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(de::Error::custom(HERE))
    }
}

impl<'de> DeserializeSeed<'de> for Seek<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        if self.tokens.is_empty() {
            d.deserialize_any(Here)
        } else {
            d.deserialize_any(self)
        }
    }
}

impl<'de> Visitor<'de> for Seek<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a mapping or a sequence")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<Key>()? {
            if key.0 == self.tokens[0] {
                return map.next_value_seed(Seek {
                    tokens: &self.tokens[1..],
                });
            }
            map.next_value::<IgnoredAny>()?;
        }
        // Not there: the mapping is as close as it gets.
        Err(de::Error::custom(HERE))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let want: Option<usize> = self.tokens[0].parse().ok();
        let mut i = 0;
        loop {
            if Some(i) == want {
                return match seq.next_element_seed(Seek {
                    tokens: &self.tokens[1..],
                })? {
                    Some(()) => Ok(()),
                    None => Err(de::Error::custom(HERE)),
                };
            }
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Err(de::Error::custom(HERE));
            }
            i += 1;
        }
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Err(E::custom(HERE))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Err(E::custom(HERE))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Err(E::custom(HERE))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Err(E::custom(HERE))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Err(E::custom(HERE))
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Err(E::custom(HERE))
    }
}

/// Walks down `tokens`, then reads a `T` there.
struct Take<'p, T> {
    tokens: &'p [String],
    _t: std::marker::PhantomData<T>,
}

impl<'de, T: de::DeserializeOwned> DeserializeSeed<'de> for Take<'_, T> {
    type Value = Option<T>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Option<T>, D::Error> {
        if self.tokens.is_empty() {
            T::deserialize(d).map(Some)
        } else {
            d.deserialize_any(self)
        }
    }
}

impl<'de, T: de::DeserializeOwned> Visitor<'de> for Take<'_, T> {
    type Value = Option<T>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a mapping")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<T>, A::Error> {
        let mut found = None;
        while let Some(key) = map.next_key::<Key>()? {
            if found.is_none() && key.0 == self.tokens[0] {
                found = map.next_value_seed(Take::<T> {
                    tokens: &self.tokens[1..],
                    _t: std::marker::PhantomData,
                })?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Option<T>, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(None)
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Option<T>, E> {
        Ok(None)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Option<T>, E> {
        Ok(None)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Option<T>, E> {
        Ok(None)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Option<T>, E> {
        Ok(None)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Option<T>, E> {
        Ok(None)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Option<T>, E> {
        Ok(None)
    }
}

/// A mapping key of any scalar kind, as text (YAML allows `200:`).
struct Key(String);

impl<'de> de::Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Key, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a scalar key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
                Ok(Key(v.to_owned()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Key, E> {
                Ok(Key(String::new()))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const DOC: &str = "\
openapi: 3.1.0
info: {title: t, version: '1'}
paths:
  /pets:
    get:
      operationId: 7
      responses:
        '200': {description: ok}
  /pets/{id}:
    servers:
      - url: https://a.example.com
      - url: /v2
";

    #[test]
    fn pointers_find_their_lines_and_columns() {
        assert_eq!(locate(DOC, "/paths/~1pets/get/operationId"), Some((6, 20)));
        assert_eq!(
            locate(DOC, "/paths/~1pets~1{id}/servers/1/url"),
            Some((12, 14))
        );
        // A key that is not there: the deepest mapping on the way.
        assert_eq!(locate(DOC, "/paths/~1pets/get/nope").map(|l| l.0), Some(6));
        assert_eq!(locate(DOC, "/info/title"), Some((2, 15)));
        assert_eq!(locate("{{{", "/a"), None);
    }

    #[test]
    fn json_documents_are_located_too() {
        let doc = "{\n  \"swagger\": \"2.0\",\n  \"paths\": {\n    \"/a\": {\"get\": 3}\n  }\n}\n";
        assert_eq!(locate(doc, "/paths/~1a/get"), Some((4, 19)));
    }

    #[test]
    fn values_are_read_where_the_pointer_points() {
        let v: Option<Vec<String>> = deserialize_at("a: {b: [x, y]}\n", "/a/b").unwrap();
        assert_eq!(v, Some(vec!["x".to_owned(), "y".to_owned()]));
        let v: Option<u32> = deserialize_at("a: 1\n", "/b").unwrap();
        assert_eq!(v, None);
        let e = deserialize_at::<bool>("a:\n  b: 0\n", "/a/b").unwrap_err();
        assert_eq!(e.location().map(|l| l.line()), Some(2));
    }
}
