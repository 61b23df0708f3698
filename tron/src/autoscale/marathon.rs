//! The `marathon` substrate: Runners as the instances of one Marathon app
//! per Func on Mesos, through Marathon's REST API: `GET /v2/apps/{id}`
//! (`app.instances`, `app.tasksRunning`) and `PUT /v2/apps/{id}` with
//! `{"instances": n}`. Marathon kills a task with SIGTERM and then, after
//! the app's `taskKillGracePeriodSeconds`, SIGKILL, so the Runner drains
//! before it exits (`deploy/marathon/` sets the grace period).

use super::substrate::{BoxFut, Observed, ScaleError, Substrate};

/// Runner apps on one Marathon.
pub struct MarathonSubstrate {
    http: reqwest::Client,
    base: String,
    /// App id, `{func}` replaced by the Func's name.
    app: String,
}

fn err(e: impl std::fmt::Display) -> ScaleError {
    ScaleError::new("marathon", e)
}

impl MarathonSubstrate {
    /// Marathon at `base` (for example `http://marathon.mesos:8080`).
    pub fn new(base: &str, app: &str) -> Self {
        MarathonSubstrate {
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(5))
                .build()
                .unwrap_or_default(),
            base: base.trim_end_matches('/').to_owned(),
            app: app.to_owned(),
        }
    }

    fn url(&self, func: &str) -> String {
        let id = self.app.replace("{func}", func);
        format!("{}/v2/apps/{}", self.base, id.trim_start_matches('/'))
    }
}

impl Substrate for MarathonSubstrate {
    fn kind(&self) -> &'static str {
        "marathon"
    }

    fn observe<'a>(&'a self, func: &'a str) -> BoxFut<'a, Result<Observed, ScaleError>> {
        Box::pin(async move {
            let url = self.url(func);
            let r = self.http.get(&url).send().await.map_err(err)?;
            let status = r.status();
            let v: serde_json::Value = r.json().await.map_err(err)?;
            if !status.is_success() {
                return Err(err(format!(
                    "{url}: {status} {}",
                    v["message"].as_str().unwrap_or_default()
                )));
            }
            let n = |k: &str| v["app"][k].as_u64().unwrap_or(0) as u32;
            Ok(Observed {
                requested: n("instances"),
                running: n("tasksRunning"),
            })
        })
    }

    fn scale<'a>(&'a self, func: &'a str, runners: u32) -> BoxFut<'a, Result<(), ScaleError>> {
        Box::pin(async move {
            let url = self.url(func);
            let r = self
                .http
                .put(&url)
                .json(&serde_json::json!({"instances": runners}))
                .send()
                .await
                .map_err(err)?;
            let status = r.status();
            if !status.is_success() {
                let v: serde_json::Value = r.json().await.unwrap_or_default();
                return Err(err(format!(
                    "{url}: {status} {}",
                    v["message"].as_str().unwrap_or_default()
                )));
            }
            let v: serde_json::Value = r.json().await.unwrap_or_default();
            tracing::info!(func, %url, instances = runners, deployment = %v["deploymentId"], "scaled the Runner app");
            Ok(())
        })
    }
}
