//! The production ingress's configuration: render
//! `ingress-lua/nginx.conf.template` for one broker and listen address
//! (`funcatron nginx-config`), and optionally the Tron that takes its
//! asynchronous calls ([`TronTarget`]), so operators get a working nginx +
//! Lua ingress with one command.

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

/// The Tron that takes the nginx ingress's asynchronous calls.
pub struct TronTarget {
    /// Its management API (`http://host:port`): it records and queues the
    /// calls and answers their status reads.
    pub url: String,
    /// The file holding its admin token (read by nginx once, at start).
    pub token_file: PathBuf,
}

/// The locations that hand async calls to a Tron: an internal one the Lua
/// handler posts each envelope to (with the token from `init_by_lua`, and
/// none of the client's headers), and the status reads, proxied as they are.
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

/// [`render`], with asynchronous calls handed to `tron`.
pub fn render_with_tron(c: &NginxConfig, tron: Option<&TronTarget>) -> Result<String> {
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
            r#"location ^~ /_funcatron/calls/ {
            content_by_lua_block { require("funcatron.ingress").no_calls() }
        }"#
            .to_owned(),
            String::new(),
        ),
    };
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
        .replace("{{ROUTING}}", c.routing.as_str());
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
