//! The production ingress's configuration: render
//! `ingress-lua/nginx.conf.template` for one broker and listen address
//! (`funcatron nginx-config`), so operators get a working nginx + Lua
//! ingress with one command.

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

/// Render the config and create the prefix's log directory.
pub fn render(c: &NginxConfig) -> Result<String> {
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
        .replace("{{LISTEN}}", &c.listen);
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
}
