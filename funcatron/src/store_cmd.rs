//! `funcatron store ...`: the JSON document store (`documents/`) from the
//! command line. Operator -> **this** -> a Tron's management listener (or
//! any listener serving `/_funcatron/store/...`: the embedded ingress, the
//! nginx ingress) -> [`funcatron_documents::http`] -> the state store.
//!
//! Reads go with the management token, else the read token; writes and
//! collection changes with the management token (`--tron` may also be an
//! ingress and `--token` a collection's token). Every answer is printed as
//! the JSON the server sent; a refusal is an error with the server's status,
//! code and message.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use funcatron_documents::http::PREFIX;
use funcatron_documents::{Access, Definition, Document, Page};
use reqwest::{Method, RequestBuilder, Url};
use serde_json::Value;

use crate::client::Remote;

/// `funcatron store ...`.
#[derive(Subcommand)]
pub enum StoreCmd {
    /// Every collection: its definition and its tokens (ids only).
    Collections(RemoteArgs),
    /// Define a collection, or replace its definition: a flag not given
    /// takes its default (no schema, operator only). Its documents and
    /// tokens are kept; a new schema applies to later writes.
    Define(DefineArgs),
    /// One collection: its definition, tokens and number of documents.
    Collection(CollectionArgs),
    /// Remove a collection (refused while it holds documents).
    Drop(CollectionArgs),
    /// A collection's access tokens: add, revoke.
    #[command(subcommand)]
    Token(TokenCmd),
    /// One document, with its version.
    Get(DocArgs),
    /// Write a whole document, creating it when there is none.
    Put(PutArgs),
    /// Create a document with a fresh id (printed with it).
    Create(CreateArgs),
    /// Change a document: a JSON merge patch (RFC 7396), or with
    /// `--json-patch` a JSON Patch (RFC 6902).
    Patch(PatchArgs),
    /// Delete a document (printed as it was).
    Delete(DeleteArgs),
    /// Documents in id order, a page at a time, or every one with `--all`.
    List(ListArgs),
}

/// `funcatron store token ...`.
#[derive(Subcommand)]
pub enum TokenCmd {
    /// Make a token of the collection, for its `token` access rules; the
    /// token is printed now and never again.
    Add(TokenAddArgs),
    /// Revoke a token by its id (as `store collection` lists them).
    Revoke(TokenRevokeArgs),
}

/// No arguments but where the Tron is.
#[derive(Args)]
pub struct RemoteArgs {
    #[command(flatten)]
    remote: Remote,
}

/// Who may read or write a collection over HTTP.
#[derive(Clone, Copy, ValueEnum)]
enum AccessArg {
    /// Anyone who reaches the listener.
    Public,
    /// A token of the collection (`store token add`), or an operator token.
    Token,
    /// Only the Tron's tokens (the read token reads, the admin token writes).
    Operator,
}

impl From<AccessArg> for Access {
    fn from(a: AccessArg) -> Self {
        match a {
            AccessArg::Public => Access::Public,
            AccessArg::Token => Access::Token,
            AccessArg::Operator => Access::Operator,
        }
    }
}

/// `store define`.
#[derive(Args)]
pub struct DefineArgs {
    /// The collection (1 to 64 of a-z 0-9 _ -).
    collection: String,
    /// A JSON Schema every written document must match (`.yaml` or `.yml`
    /// is read as YAML, anything else as JSON).
    #[arg(long, value_name = "FILE")]
    schema: Option<PathBuf>,
    /// Who may read it.
    #[arg(long, value_enum, default_value = "operator")]
    read: AccessArg,
    /// Who may write it.
    #[arg(long, value_enum, default_value = "operator")]
    write: AccessArg,
    #[command(flatten)]
    remote: Remote,
}

/// A collection.
#[derive(Args)]
pub struct CollectionArgs {
    /// The collection.
    collection: String,
    #[command(flatten)]
    remote: Remote,
}

/// `store token add`.
#[derive(Args)]
pub struct TokenAddArgs {
    /// The collection.
    collection: String,
    /// The token may write too (every token may read).
    #[arg(long)]
    write: bool,
    #[command(flatten)]
    remote: Remote,
}

/// `store token revoke`.
#[derive(Args)]
pub struct TokenRevokeArgs {
    /// The collection.
    collection: String,
    /// The token's id (not the token).
    id: String,
    #[command(flatten)]
    remote: Remote,
}

/// A document.
#[derive(Args)]
pub struct DocArgs {
    /// The collection.
    collection: String,
    /// The document's id.
    id: String,
    #[command(flatten)]
    remote: Remote,
}

/// A document's JSON: given, from a file, or from stdin.
#[derive(Args)]
#[group(required = true, multiple = false)]
struct Input {
    /// The JSON text (`-`: read it from stdin).
    #[arg(short, long, value_name = "JSON")]
    data: Option<String>,
    /// A file holding the JSON (`-`: stdin).
    #[arg(short, long, value_name = "FILE")]
    file: Option<PathBuf>,
}

/// `store put`.
#[derive(Args)]
pub struct PutArgs {
    /// The collection.
    collection: String,
    /// The document's id (1 to 200 of A-Z a-z 0-9 . _ ~ - : @).
    id: String,
    /// Only if the document is at this version (as a read shows it), or
    /// `*` for any version of an existing one: no update is lost.
    #[arg(long, value_name = "VERSION", value_parser = if_match, conflicts_with = "create_only")]
    if_match: Option<String>,
    /// Only if there is no such document yet.
    #[arg(long)]
    create_only: bool,
    #[command(flatten)]
    input: Input,
    #[command(flatten)]
    remote: Remote,
}

/// `store create`.
#[derive(Args)]
pub struct CreateArgs {
    /// The collection.
    collection: String,
    #[command(flatten)]
    input: Input,
    #[command(flatten)]
    remote: Remote,
}

/// `store patch`.
#[derive(Args)]
pub struct PatchArgs {
    /// The collection.
    collection: String,
    /// The document's id.
    id: String,
    /// Only if the document is at this version.
    #[arg(long, value_name = "VERSION", value_parser = if_match)]
    if_match: Option<String>,
    /// The patch is a JSON Patch (`[{"op": "replace", ...}]`), not a
    /// merge patch.
    #[arg(long)]
    json_patch: bool,
    #[command(flatten)]
    input: Input,
    #[command(flatten)]
    remote: Remote,
}

/// `store delete`.
#[derive(Args)]
pub struct DeleteArgs {
    /// The collection.
    collection: String,
    /// The document's id.
    id: String,
    /// Only if the document is at this version.
    #[arg(long, value_name = "VERSION", value_parser = if_match)]
    if_match: Option<String>,
    #[command(flatten)]
    remote: Remote,
}

/// `store list`.
#[derive(Args)]
pub struct ListArgs {
    /// The collection.
    collection: String,
    /// Only documents whose top-level FIELD equals VALUE (repeatable: all
    /// must hold). VALUE is read as JSON when it can be (`3`, `true`,
    /// `null`, `'"3"'` for the string), else as text.
    #[arg(long = "where", value_name = "FIELD=VALUE")]
    filters: Vec<String>,
    /// Most documents per page (the server's default 100, at most 1000).
    #[arg(long)]
    limit: Option<usize>,
    /// Only ids after this one (the `next` of the previous page).
    #[arg(long, value_name = "ID")]
    after: Option<String>,
    /// Follow `next` to the end and print every document as one JSON
    /// array (`--limit` is then the size of each page fetched).
    #[arg(long)]
    all: bool,
    #[command(flatten)]
    remote: Remote,
}

/// `--if-match`: a version (`3`, or the ETag `"3"`) or `*`, as the
/// `If-Match` header wants it.
fn if_match(s: &str) -> Result<String, String> {
    let v = s.trim().trim_start_matches("W/").trim_matches('"');
    if v == "*" {
        return Ok("*".to_owned());
    }
    v.parse::<u64>()
        .map(|n| format!("\"{n}\""))
        .map_err(|_| format!("{s:?}: a version (a document's `version`) or *"))
}

/// `--where FIELD=VALUE` as the query pair the server reads (`where.`
/// keeps a field named `limit` or `after` a filter).
fn filter_pair(arg: &str) -> Result<(String, String)> {
    match arg.split_once('=') {
        Some((field, value)) if !field.is_empty() => {
            Ok((format!("where.{field}"), value.to_owned()))
        }
        _ => bail!("--where {arg}: expected FIELD=VALUE"),
    }
}

/// A collection name and a document id, checked by the store's own rules
/// before they go into a URL: an id such as `_collection` would name
/// another route (a `put` would define the collection).
fn checked(collection: &str, id: Option<&str>) -> Result<()> {
    funcatron_documents::collections::check_name(collection)?;
    if let Some(id) = id {
        funcatron_documents::check_id(id)?;
    }
    Ok(())
}

fn pretty(v: &Value) -> String {
    format!("{}\n", serde_json::to_string_pretty(v).unwrap_or_default())
}

fn stdin() -> Result<String> {
    let mut s = String::new();
    std::io::stdin()
        .read_to_string(&mut s)
        .context("reading the document from stdin")?;
    Ok(s)
}

/// The JSON of `--data` or `--file` (checked here, for a plain error).
fn read_json(input: &Input) -> Result<Value> {
    let (text, from) = match (&input.data, &input.file) {
        (Some(d), _) if d == "-" => (stdin()?, "stdin".to_owned()),
        (Some(d), _) => (d.clone(), "--data".to_owned()),
        (None, Some(f)) if f.as_os_str() == "-" => (stdin()?, "stdin".to_owned()),
        (None, Some(f)) => (
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?,
            f.display().to_string(),
        ),
        (None, None) => bail!("give the JSON: --data JSON, --file FILE, or --file - (stdin)"),
    };
    serde_json::from_str(&text).with_context(|| format!("{from} is not JSON"))
}

/// A schema file, JSON or (by its extension) YAML.
fn read_schema(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let yaml = matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    );
    if yaml {
        serde_yaml_ng::from_str(&text).with_context(|| format!("{} is not YAML", path.display()))
    } else {
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
    }
}

/// The answer's JSON, or an error with the server's status, code and
/// message for anything but a 2xx.
async fn answer(r: reqwest::Response) -> Result<Value> {
    let status = r.status();
    let path = r.url().path().to_owned();
    let text = r.text().await.context("reading the answer")?;
    if status.is_success() {
        return serde_json::from_str(&text)
            .with_context(|| format!("reading the answer of {path}: {text}"));
    }
    let refusal = serde_json::from_str::<Value>(&text).ok();
    match refusal.as_ref().and_then(|v| Some((v.get("error")?, v.get("message")?.as_str()?))) {
        Some((code, message)) => bail!("{status} ({}): {message}", code.as_str().unwrap_or("?")),
        None if status == reqwest::StatusCode::NOT_FOUND => bail!(
            "{status}: {path} is not served there (a Tron serves the document store only with a state store): {text}"
        ),
        None => bail!("{status}: {text}"),
    }
}

/// The store's routes on one Tron.
struct Api<'a> {
    http: reqwest::Client,
    remote: &'a Remote,
}

impl<'a> Api<'a> {
    fn new(remote: &'a Remote) -> Self {
        Api {
            http: reqwest::Client::new(),
            remote,
        }
    }

    /// `PREFIX/<segments...>`, each segment percent-encoded.
    fn url(&self, segments: &[&str]) -> Result<Url> {
        let base = self.remote.url(PREFIX);
        let mut url = Url::parse(&base)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.has_host())
            .with_context(|| format!("{base}: the Tron's address is an http:// or https:// URL"))?;
        let mut path = url
            .path_segments_mut()
            .map_err(|()| anyhow::anyhow!("{base}: the Tron's address cannot have a path"))?;
        for s in segments {
            // The URL would drop `.` and `..`, and an empty one names
            // nothing: refused here, not sent as another route.
            if s.is_empty() || *s == "." || *s == ".." {
                bail!("{s:?} names nothing the store has");
            }
            path.push(s);
        }
        drop(path);
        Ok(url)
    }

    /// A request with the Remote's token: the management token, or for a
    /// GET the read token when that is all there is.
    fn request(&self, method: Method, segments: &[&str]) -> Result<RequestBuilder> {
        let url = self.url(segments)?;
        let rb = if method == Method::GET {
            self.remote.get(&self.http, PREFIX)?
        } else {
            self.remote.post(&self.http, PREFIX)?
        };
        let (client, request) = rb.build_split();
        let mut request = request.context("building the request")?;
        *request.method_mut() = method;
        *request.url_mut() = url;
        Ok(RequestBuilder::from_parts(client, request))
    }

    async fn send(&self, rb: RequestBuilder) -> Result<Value> {
        let r = rb
            .send()
            .await
            .with_context(|| format!("calling {}", self.remote.url(PREFIX)))?;
        answer(r).await
    }

    async fn call(&self, method: Method, segments: &[&str]) -> Result<Value> {
        self.send(self.request(method, segments)?).await
    }
}

/// Run a `store` command; returns what to print.
pub async fn run(cmd: StoreCmd) -> Result<String> {
    target(&cmd)?;
    let v = match cmd {
        StoreCmd::Collections(a) => Api::new(&a.remote).call(Method::GET, &[]).await?,
        StoreCmd::Define(a) => define(&a).await?,
        StoreCmd::Collection(a) => {
            Api::new(&a.remote)
                .call(Method::GET, &[&a.collection, "_collection"])
                .await?
        }
        StoreCmd::Drop(a) => {
            Api::new(&a.remote)
                .call(Method::DELETE, &[&a.collection, "_collection"])
                .await?
        }
        StoreCmd::Token(TokenCmd::Add(a)) => {
            let api = Api::new(&a.remote);
            let rb = api.request(Method::POST, &[&a.collection, "_tokens"])?;
            api.send(rb.json(&serde_json::json!({"write": a.write})))
                .await?
        }
        StoreCmd::Token(TokenCmd::Revoke(a)) => {
            Api::new(&a.remote)
                .call(Method::DELETE, &[&a.collection, "_tokens", &a.id])
                .await?
        }
        StoreCmd::Get(a) => {
            Api::new(&a.remote)
                .call(Method::GET, &[&a.collection, &a.id])
                .await?
        }
        StoreCmd::Put(a) => put(&a).await?,
        StoreCmd::Create(a) => {
            let doc = read_json(&a.input)?;
            let api = Api::new(&a.remote);
            api.send(api.request(Method::POST, &[&a.collection])?.json(&doc))
                .await?
        }
        StoreCmd::Patch(a) => patch(&a).await?,
        StoreCmd::Delete(a) => {
            let api = Api::new(&a.remote);
            let mut rb = api.request(Method::DELETE, &[&a.collection, &a.id])?;
            if let Some(v) = &a.if_match {
                rb = rb.header(reqwest::header::IF_MATCH, v);
            }
            api.send(rb).await?
        }
        StoreCmd::List(a) if a.all => return list_all(&a).await,
        StoreCmd::List(a) => list_page(&a, a.after.as_deref()).await?,
    };
    Ok(pretty(&v))
}

/// [`checked`] on the collection and document a command names.
fn target(cmd: &StoreCmd) -> Result<()> {
    match cmd {
        StoreCmd::Collections(_) => Ok(()),
        StoreCmd::Define(DefineArgs { collection, .. })
        | StoreCmd::Collection(CollectionArgs { collection, .. })
        | StoreCmd::Drop(CollectionArgs { collection, .. })
        | StoreCmd::Token(TokenCmd::Add(TokenAddArgs { collection, .. }))
        | StoreCmd::Token(TokenCmd::Revoke(TokenRevokeArgs { collection, .. }))
        | StoreCmd::Create(CreateArgs { collection, .. })
        | StoreCmd::List(ListArgs { collection, .. }) => checked(collection, None),
        StoreCmd::Get(DocArgs { collection, id, .. })
        | StoreCmd::Put(PutArgs { collection, id, .. })
        | StoreCmd::Patch(PatchArgs { collection, id, .. })
        | StoreCmd::Delete(DeleteArgs { collection, id, .. }) => checked(collection, Some(id)),
    }
}

async fn define(a: &DefineArgs) -> Result<Value> {
    let definition = Definition {
        schema: a.schema.as_deref().map(read_schema).transpose()?,
        read: a.read.into(),
        write: a.write.into(),
    };
    let api = Api::new(&a.remote);
    let rb = api.request(Method::PUT, &[&a.collection, "_collection"])?;
    api.send(rb.json(&definition)).await
}

async fn put(a: &PutArgs) -> Result<Value> {
    let doc = read_json(&a.input)?;
    let api = Api::new(&a.remote);
    let mut rb = api.request(Method::PUT, &[&a.collection, &a.id])?;
    if let Some(v) = &a.if_match {
        rb = rb.header(reqwest::header::IF_MATCH, v);
    } else if a.create_only {
        rb = rb.header(reqwest::header::IF_NONE_MATCH, "*");
    }
    api.send(rb.json(&doc)).await
}

async fn patch(a: &PatchArgs) -> Result<Value> {
    let body = read_json(&a.input)?;
    let api = Api::new(&a.remote);
    let mut rb = api
        .request(Method::PATCH, &[&a.collection, &a.id])?
        .header(
            reqwest::header::CONTENT_TYPE,
            if a.json_patch {
                "application/json-patch+json"
            } else {
                "application/merge-patch+json"
            },
        )
        .body(body.to_string());
    if let Some(v) = &a.if_match {
        rb = rb.header(reqwest::header::IF_MATCH, v);
    }
    api.send(rb).await
}

/// One page of `store list`, from after `after`.
async fn list_page(a: &ListArgs, after: Option<&str>) -> Result<Value> {
    let mut query = a
        .filters
        .iter()
        .map(|f| filter_pair(f))
        .collect::<Result<Vec<_>>>()?;
    if let Some(n) = a.limit {
        query.push(("limit".to_owned(), n.to_string()));
    }
    if let Some(after) = after {
        query.push(("after".to_owned(), after.to_owned()));
    }
    let api = Api::new(&a.remote);
    api.send(api.request(Method::GET, &[&a.collection])?.query(&query))
        .await
}

/// `store list --all`: every page, as one array of documents.
async fn list_all(a: &ListArgs) -> Result<String> {
    let mut documents: Vec<Document> = Vec::new();
    let mut after = a.after.clone();
    loop {
        let page: Page = serde_json::from_value(list_page(a, after.as_deref()).await?)
            .context("reading a page of the listing")?;
        documents.extend(page.documents);
        match page.next {
            None => break,
            Some(next) if after.as_deref() == Some(next.as_str()) => {
                bail!("the listing does not move on after {next}")
            }
            Some(next) => after = Some(next),
        }
    }
    Ok(format!(
        "{}\n",
        serde_json::to_string_pretty(&documents).context("printing the documents")?
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_sent_as_etags() {
        assert_eq!(if_match("3").as_deref(), Ok("\"3\""));
        assert_eq!(if_match("\"3\"").as_deref(), Ok("\"3\""));
        assert_eq!(if_match("W/\"3\"").as_deref(), Ok("\"3\""));
        assert_eq!(if_match("*").as_deref(), Ok("*"));
        assert!(if_match("three").is_err());
    }

    #[test]
    fn filters_are_where_pairs() {
        assert_eq!(
            filter_pair("limit=3").unwrap(),
            ("where.limit".to_owned(), "3".to_owned())
        );
        assert_eq!(
            filter_pair("a=b=c").unwrap(),
            ("where.a".to_owned(), "b=c".to_owned())
        );
        assert!(filter_pair("=x").is_err());
        assert!(filter_pair("x").is_err());
    }

    #[test]
    fn names_and_ids_are_encoded_as_segments() {
        use clap::Parser;
        #[derive(Parser)]
        struct R {
            #[command(flatten)]
            remote: Remote,
        }
        let r = R::parse_from(["r", "--tron", "http://127.0.0.1:9/base/"]);
        let api = Api::new(&r.remote);
        let url = api.url(&["a b", "x/y?z#%"]).unwrap();
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:9/base/_funcatron/store/a%20b/x%2Fy%3Fz%23%25"
        );
        for bad in ["", ".", ".."] {
            assert!(api.url(&["c", bad]).is_err(), "{bad:?}");
        }
    }
}
