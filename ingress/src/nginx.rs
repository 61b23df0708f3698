//! The production ingress's configuration: render
//! `ingress-lua/nginx.conf.template` for one broker and listen address
//! (`funcatron nginx-config`), optionally the Tron that takes its
//! asynchronous calls ([`TronTarget`]) and its direct mode's settings
//! ([`NginxDirectArgs`]), so operators get a working nginx + Lua ingress
//! with one command.

use std::path::{Path, PathBuf};

use percent_encoding::percent_decode_str;

/// The template, compiled in so the binary needs nothing beside it.
pub const TEMPLATE: &str = include_str!("../../ingress-lua/nginx.conf.template");

/// Why a config could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum NginxConfigError {
    /// An option is unusable.
    #[error("{0}")]
    Invalid(String),
    /// A directory could not be created or found.
    #[error("{path}: {source}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, NginxConfigError>;

fn invalid(m: impl Into<String>) -> NginxConfigError {
    NginxConfigError::Invalid(m.into())
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> NginxConfigError + '_ {
    move |source| NginxConfigError::Io {
        path: path.to_owned(),
        source,
    }
}

fn decode(s: &str) -> Result<String> {
    percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|e| invalid(format!("--broker: {e}")))
}

/// Debian's module files for `libnginx-mod-http-lua`; OpenResty needs none.
const DEBIAN_MODULES: &[&str] = &[
    "/usr/lib/nginx/modules/ndk_http_module.so",
    "/usr/lib/nginx/modules/ngx_http_lua_module.so",
];

/// What goes into the config.
pub struct NginxConfig {
    /// The AMQP URL the rest of the cluster uses (host, port, vhost and
    /// credentials); the Lua ingress speaks AMQP 0-9-1 to the same broker.
    pub broker: String,
    /// nginx `listen` value.
    pub listen: String,
    /// Directory for logs, pid and temp files.
    pub prefix: PathBuf,
    /// Directory holding `funcatron/*.lua`.
    pub lua_dir: PathBuf,
    /// nginx worker processes (`auto` or a number).
    pub workers: String,
    /// Request deadline.
    pub timeout_ms: u64,
    /// Largest body accepted.
    pub max_body_bytes: usize,
    /// Emit `load_module` lines for Debian's packaged modules.
    pub load_modules: bool,
    /// error_log level.
    pub log_level: String,
    /// Who routes: the Lua ingress at the edge, by the Trons' table, or a
    /// Tron.
    pub routing: crate::edge::Routing,
}

/// Direct mode at the nginx ingress, as on the embedded one
/// ([`crate::args::IngressArgs`]): synchronous requests on a direct
/// route, asking for `text/event-stream`, or with bodies past the
/// threshold queue only their head; nginx's proxy then streams the body
/// to the Runner's one-time URL and the answer back. `nginx-config`'s own
/// flags, the same names and defaults as `funcatron ingress`'s.
#[derive(Debug, Clone, clap::Args)]
pub struct NginxDirectArgs {
    /// Synchronous requests with a larger body go in direct mode (a body
    /// sent without a length, chunked, always does, as nginx would have to
    /// read it whole to learn its size); 0: never by size (direct routes
    /// and `Accept: text/event-stream` still go direct).
    #[arg(long, env = "FUNCATRON_DIRECT_THRESHOLD_BYTES", default_value_t = crate::args::DEFAULT_DIRECT_THRESHOLD_BYTES)]
    pub direct_threshold_bytes: usize,
    /// Largest body of a request in direct mode, in bytes.
    #[arg(long, env = "FUNCATRON_MAX_DIRECT_BODY_BYTES", default_value_t = crate::args::DEFAULT_MAX_DIRECT_BODY_BYTES)]
    pub max_direct_body_bytes: u64,
    /// DNS servers nginx resolves Runners' direct addresses with (an nginx
    /// `resolver` value, e.g. `10.0.0.2 valid=30s`). Needed only when
    /// Runners advertise host names (`--direct-advertise`); IP addresses,
    /// the default, need none.
    #[arg(long, env = "FUNCATRON_NGINX_RESOLVER")]
    pub resolver: Option<String>,
}

impl Default for NginxDirectArgs {
    fn default() -> Self {
        NginxDirectArgs {
            direct_threshold_bytes: crate::args::DEFAULT_DIRECT_THRESHOLD_BYTES,
            max_direct_body_bytes: crate::args::DEFAULT_MAX_DIRECT_BODY_BYTES,
            resolver: None,
        }
    }
}

/// The `resolver` directive for `--resolver`, or nothing.
fn resolver(value: Option<&str>) -> Result<String> {
    let Some(v) = value.map(str::trim) else {
        return Ok(String::new());
    };
    if v.is_empty() || v.contains([';', '{', '}', '"', '\'', '$', '\n', '\r', '#']) {
        return Err(invalid(format!(
            "--resolver {v:?}: give nginx resolver addresses and options only"
        )));
    }
    Ok(format!("resolver {v};"))
}

/// The Tron that takes the nginx ingress's asynchronous calls.
pub struct TronTarget {
    /// Its management API (`http://host:port`): it records and queues the
    /// calls and answers their status reads.
    pub url: String,
    /// The file holding its admin token (read by nginx once, at start).
    pub token_file: PathBuf,
}

/// Largest body nginx lets through to the document store: a document
/// (`funcatron_documents::MAX_DOCUMENT_BYTES`, 1 MiB) and room to spare, so
/// the Tron, which allows a little over a document, answers a body past
/// its own limit with its JSON 413 (`body_too_large`); only bodies past
/// this one get nginx's (`payload_too_large`).
pub const STORE_MAX_BODY_BYTES: usize = (1 << 20) + 64 * 1024;

/// The locations that hand async calls to a Tron: an internal one the Lua
/// handler posts each envelope to (with the token from `init_by_lua`, and
/// none of the client's headers), and the status reads, proxied as they
/// are; and the document store ([`store_locations`]).
fn tron_locations(url: &str) -> String {
    format!(
        r#"location = /_funcatron/tron/submit {{
            internal;
            set_by_lua_block $funcatron_tron_auth {{ return require("funcatron.ingress").tron_auth() }}
            proxy_pass_request_headers off;
            proxy_set_header Authorization $funcatron_tron_auth;
            proxy_set_header Content-Type application/json;
            proxy_pass {url}/v1/calls;
        }}
        location ^~ /_funcatron/calls/ {{
            proxy_pass {url};
        }}
        {}
        location @funcatron_store_failed {{
            content_by_lua_block {{ require("funcatron.ingress").store_failed() }}
        }}"#,
        store_locations(&format!(
            r#"client_max_body_size {STORE_MAX_BODY_BYTES};
            set $funcatron_body_limit {STORE_MAX_BODY_BYTES};
            error_page 413 = @funcatron_too_large;
            error_page 502 504 = @funcatron_store_failed;
            proxy_pass {url};"#
        ))
    )
}

/// The document store's locations, `/_funcatron/store` and every path
/// below it (not `/_funcatron/storefront`: the paths the embedded ingress
/// serves it on), each doing `body`. With a Tron they are proxied as they
/// are, the client's `Authorization` and body with them (the Tron checks
/// the token against the collection's rules; the Lua handler is not
/// involved), and nginx's own failures to reach it are the JSON 503 of
/// `@funcatron_store_failed`; without one, a JSON 501.
fn store_locations(body: &str) -> String {
    format!(
        r#"location = /_funcatron/store {{
            {body}
        }}
        location ^~ /_funcatron/store/ {{
            {body}
        }}"#
    )
}

/// A Tron URL nginx can proxy to: http(s), host and port, no path.
fn tron_url(url: &str) -> Result<String> {
    let url = url.trim_end_matches('/');
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| invalid("--tron-url must be an http:// or https:// URL"))?;
    if rest.is_empty() || rest.contains(['/', '?', '#', ' ', ';', '"', '{', '}']) {
        return Err(invalid(format!(
            "--tron-url {url:?}: give the Tron's management address only (http://host:port)"
        )));
    }
    Ok(url.to_owned())
}

struct Amqp {
    host: String,
    port: u16,
    vhost: String,
    login: String,
    passcode: String,
}

fn parse_amqp(url: &str) -> Result<Amqp> {
    let rest = url.strip_prefix("amqp://").ok_or_else(|| {
        invalid("--broker must be an amqp:// URL (the nginx ingress talks to RabbitMQ)")
    })?;
    let (authority, vhost) = match rest.split_once('/') {
        Some((a, v)) if !v.is_empty() => (a, decode(v)?),
        Some((a, _)) => (a, "/".to_owned()),
        None => (rest, "/".to_owned()),
    };
    let (userinfo, hostport) = authority
        .rsplit_once('@')
        .unwrap_or(("guest:guest", authority));
    let (login, passcode) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) => (
            h,
            p.parse()
                .map_err(|_| invalid(format!("--broker: bad port {p:?}")))?,
        ),
        None => (hostport, 5672),
    };
    let host = if host.is_empty() { "127.0.0.1" } else { host };
    Ok(Amqp {
        host: host.to_owned(),
        port,
        vhost,
        login: decode(login)?,
        passcode: decode(passcode)?,
    })
}

fn lua_quote(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

fn abs(p: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(p).map_err(io_err(p))?;
    p.canonicalize().map_err(io_err(p))
}

/// Render the config and create the prefix's log directory; asynchronous
/// calls answer 501 (see [`render_with_tron`]).
pub fn render(c: &NginxConfig) -> Result<String> {
    render_with_tron(c, None)
}

/// [`render`], with asynchronous calls handed to `tron`; direct mode as
/// [`NginxDirectArgs::default`].
pub fn render_with_tron(c: &NginxConfig, tron: Option<&TronTarget>) -> Result<String> {
    render_with(c, tron, &NginxDirectArgs::default())
}

/// [`render_with_tron`], with these direct mode settings.
pub fn render_with(
    c: &NginxConfig,
    tron: Option<&TronTarget>,
    direct: &NginxDirectArgs,
) -> Result<String> {
    let amqp = parse_amqp(&c.broker)?;
    let prefix = abs(&c.prefix)?;
    let logs = prefix.join("logs");
    std::fs::create_dir_all(&logs).map_err(io_err(&logs))?;
    let lua_dir = c.lua_dir.canonicalize().map_err(io_err(&c.lua_dir))?;
    if !lua_dir.join("funcatron/ingress.lua").is_file() {
        return Err(invalid(format!(
            "--lua-dir {} does not hold funcatron/ingress.lua",
            lua_dir.display()
        )));
    }
    let modules = if c.load_modules {
        DEBIAN_MODULES
            .iter()
            .filter(|m| Path::new(m).is_file())
            .map(|m| format!("load_module {m};\n"))
            .collect::<String>()
    } else {
        String::new()
    };
    let (tron, locations, token_file) = match tron {
        Some(t) => {
            let file = t.token_file.canonicalize().map_err(io_err(&t.token_file))?;
            let url = tron_url(&t.url)?;
            ("true", tron_locations(&url), file.display().to_string())
        }
        None => (
            "false",
            format!(
                r#"location ^~ /_funcatron/calls/ {{
            content_by_lua_block {{ require("funcatron.ingress").no_calls() }}
        }}
        {}"#,
                store_locations(
                    r#"content_by_lua_block { require("funcatron.ingress").no_store() }"#
                )
            ),
            String::new(),
        ),
    };
    let resolver = resolver(direct.resolver.as_deref())?;
    // Declared lengths up to the larger limit reach the handler, which
    // holds each mode to its own.
    let max_request = direct.max_direct_body_bytes.max(c.max_body_bytes as u64);
    let out = TEMPLATE
        .replace("{{WORKERS}}", &c.workers)
        .replace("{{PREFIX}}", &prefix.display().to_string())
        .replace("{{LOG_LEVEL}}", &c.log_level)
        .replace("{{LOAD_MODULES}}", &modules)
        .replace("{{LUA_DIR}}", &lua_dir.display().to_string())
        .replace("{{MAX_BODY}}", &c.max_body_bytes.to_string())
        .replace("{{BROKER_HOST}}", &lua_quote(&amqp.host))
        .replace("{{BROKER_PORT}}", &amqp.port.to_string())
        .replace("{{VHOST}}", &lua_quote(&amqp.vhost))
        .replace("{{LOGIN}}", &lua_quote(&amqp.login))
        .replace("{{PASSCODE}}", &lua_quote(&amqp.passcode))
        .replace("{{TIMEOUT_MS}}", &c.timeout_ms.to_string())
        .replace("{{TRON}}", tron)
        .replace("{{TRON_TOKEN_FILE}}", &lua_quote(&token_file))
        .replace("{{TRON_LOCATIONS}}", &locations)
        .replace("{{LISTEN}}", &c.listen)
        .replace("{{ROUTING}}", c.routing.as_str())
        .replace(
            "{{DIRECT_THRESHOLD}}",
            &direct.direct_threshold_bytes.to_string(),
        )
        .replace(
            "{{MAX_DIRECT_BODY}}",
            &direct.max_direct_body_bytes.to_string(),
        )
        .replace("{{MAX_REQUEST_BODY}}", &max_request.to_string())
        .replace("{{RESOLVER}}", &resolver);
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn amqp_urls_give_the_lua_client_settings() {
        let a = parse_amqp("amqp://user:p%40ss@rabbit.local:5673/my%2Fvhost").unwrap();
        assert_eq!(a.port, 5673);
        assert_eq!(
            (
                a.host.as_str(),
                a.vhost.as_str(),
                a.login.as_str(),
                a.passcode.as_str()
            ),
            ("rabbit.local", "my/vhost", "user", "p@ss")
        );
        let a = parse_amqp("amqp://guest:guest@127.0.0.1:5672/%2f").unwrap();
        assert_eq!(a.vhost, "/");
        let a = parse_amqp("amqp://h").unwrap();
        assert_eq!(
            (a.host.as_str(), a.vhost.as_str(), a.login.as_str()),
            ("h", "/", "guest")
        );
        assert!(parse_amqp("http://x").is_err());
    }

    fn config(prefix: &Path) -> NginxConfig {
        NginxConfig {
            broker: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            listen: "127.0.0.1:8080".into(),
            prefix: prefix.to_owned(),
            lua_dir: repo_lua_dir(),
            workers: "1".into(),
            timeout_ms: 30_000,
            max_body_bytes: 1024 * 1024,
            load_modules: false,
            log_level: "warn".into(),
            routing: crate::edge::Routing::Edge,
        }
    }

    fn repo_lua_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../ingress-lua/lib")
    }

    #[test]
    fn direct_mode_settings_reach_the_config() {
        let dir = std::env::temp_dir().join(format!("funcatron-nginx-{}", std::process::id()));
        let c = config(&dir);
        let text = render(&c).unwrap();
        // Only the header's mention of {{PLACEHOLDER}} is left.
        assert_eq!(text.matches("{{").count(), 1, "every placeholder is filled");
        assert!(text.contains("direct_threshold = 1048576, max_direct_body = 4294967296"));
        // Declared lengths up to the direct limit reach the handler; a
        // queued body without a length stops at the queued one.
        assert!(text.contains("client_max_body_size 4294967296;"));
        assert!(text.contains("client_max_body_size 1048576;"));
        assert!(text.contains("grpc_pass grpc://$funcatron_direct_addr;"));
        assert!(!text.contains("resolver "));

        let direct = NginxDirectArgs {
            direct_threshold_bytes: 0,
            max_direct_body_bytes: 1000,
            resolver: Some("10.0.0.2 valid=30s".into()),
        };
        let text = render_with(&c, None, &direct).unwrap();
        assert!(text.contains("direct_threshold = 0, max_direct_body = 1000"));
        assert!(text.contains("resolver 10.0.0.2 valid=30s;"));
        // The queued limit is the larger here.
        assert!(text.contains("set $funcatron_body_limit 1048576;"));
        for bad in ["", "1.1.1.1; include /etc/passwd", "x { }", "$host"] {
            let d = NginxDirectArgs {
                resolver: Some(bad.into()),
                ..NginxDirectArgs::default()
            };
            assert!(render_with(&c, None, &d).is_err(), "{bad:?}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_document_store_goes_to_the_tron_or_is_a_501() {
        let dir =
            std::env::temp_dir().join(format!("funcatron-nginx-store-{}", std::process::id()));
        let c = config(&dir);
        let block = |text: &str, location: &str| {
            let start = text.find(location).unwrap();
            let end = start + text[start..].find('}').unwrap();
            text[start..end].to_owned()
        };

        let text = render(&c).unwrap();
        for location in [
            "location = /_funcatron/store {",
            "location ^~ /_funcatron/store/ {",
        ] {
            let b = block(&text, location);
            assert!(b.contains("no_store()"), "{b}");
        }
        assert!(!text.contains("proxy_pass"), "no Tron, nothing proxied");

        let token_file = dir.join("token");
        std::fs::write(&token_file, "t").unwrap();
        let tron = TronTarget {
            url: "http://10.0.0.5:9000/".into(),
            token_file,
        };
        let text = render_with_tron(&c, Some(&tron)).unwrap();
        assert_eq!(text.matches("{{").count(), 1, "every placeholder is filled");
        for location in [
            "location = /_funcatron/store {",
            "location ^~ /_funcatron/store/ {",
        ] {
            let b = block(&text, location);
            assert!(b.contains("proxy_pass http://10.0.0.5:9000;"), "{b}");
            // The client's headers (its token) and body go as they are,
            // up to a document and some: the Tron answers its own 413.
            assert!(!b.contains("proxy_pass_request_headers off"), "{b}");
            assert!(!b.contains("proxy_set_header Authorization"), "{b}");
            assert!(
                b.contains(&format!("client_max_body_size {STORE_MAX_BODY_BYTES};")),
                "{b}"
            );
            assert!(b.contains("error_page 413 = @funcatron_too_large;"), "{b}");
            assert!(
                b.contains("error_page 502 504 = @funcatron_store_failed;"),
                "{b}"
            );
        }
        assert!(text.contains("store_failed()"));
        assert!(!text.contains("no_store()"));
        // A document, with the Tron's own allowance of 1 KiB, fits.
        const { assert!(STORE_MAX_BODY_BYTES > (1 << 20) + 1024) };
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_tron_url_is_an_address_nginx_can_proxy_to() {
        assert_eq!(
            tron_url("http://10.0.0.5:9000/").unwrap(),
            "http://10.0.0.5:9000"
        );
        assert!(tron_url("https://tron.local").is_ok());
        for bad in [
            "tron:9000",
            "http://",
            "http://t/v1",
            "http://t;x",
            "http://t\"x",
        ] {
            assert!(tron_url(bad).is_err(), "{bad}");
        }
    }
}
