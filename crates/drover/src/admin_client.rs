//! The admin API as the command line (`drover queue`, `drover suppression`) talks to it.

use anyhow::Context;

/// The admin API, as the command line uses it.
pub(crate) struct Api {
    client: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Api {
    pub(crate) fn new(base: &str, token: Option<String>) -> Api {
        Api {
            client: reqwest::Client::new(),
            base: base.trim_end_matches('/').to_owned(),
            token,
        }
    }

    /// Sends a request; a non-2xx reply is an error with the engine's message.
    pub(crate) async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> anyhow::Result<serde_json::Value> {
        let request = match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        let response = request.send().await.context("cannot reach the engine")?;
        let status = response.status();
        let body: serde_json::Value = response.json().await.context("bad reply")?;
        if !status.is_success() {
            anyhow::bail!("{status}: {}", body["error"]);
        }
        Ok(body)
    }

    /// `GET /api/admin/v1/<path>`.
    pub(crate) async fn get(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        self.get_query(path, &[]).await
    }

    /// `GET /api/admin/v1/<path>?<query>`.
    pub(crate) async fn get_query(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> anyhow::Result<serde_json::Value> {
        self.send(
            self.client
                .get(format!("{}/api/admin/v1/{path}", self.base))
                .query(query),
        )
        .await
    }

    /// `POST /api/admin/v1/<path>` with a JSON body.
    pub(crate) async fn post(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> anyhow::Result<serde_json::Value> {
        self.send(
            self.client
                .post(format!("{}/api/admin/v1/{path}", self.base))
                .json(&body),
        )
        .await
    }
}
