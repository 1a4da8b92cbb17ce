//! The connection to quotad: the channel to `--addr`, dialled only when a command first needs
//! the server, and the bearer token sent with every call ([`quotad_proto::BearerToken`], the one
//! interceptor every client of quotad uses), checked before anything is dialled.

use std::time::Duration;

use quotad_proto::v1::quota_admin_client::QuotaAdminClient;
use quotad_proto::v1::quota_gate_client::QuotaGateClient;
use quotad_proto::{error_chain, BearerToken, TokenError};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use crate::cli::Cli;
use crate::error::CliError;

/// How long to wait for the connection before calling the server unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The interceptor for `--token` (none: no authorization is sent). A token that cannot be sent is
/// a local error, exit code 2, whose message never repeats the token: it is a secret.
fn bearer_token(token: Option<&str>) -> Result<BearerToken, CliError> {
    let Some(token) = token else {
        return Ok(BearerToken::none());
    };
    BearerToken::new(token).map_err(|error| {
        CliError::Token(
            match error {
                TokenError::Empty => "it is empty; give a token or unset QUOTAD_TOKEN",
                TokenError::NotVisibleAscii => {
                    "it must be printable ASCII without spaces or line breaks"
                }
            }
            .to_string(),
        )
    })
}

pub type AdminClient = QuotaAdminClient<InterceptedService<Channel, BearerToken>>;
pub type GateClient = QuotaGateClient<InterceptedService<Channel, BearerToken>>;

/// Connects when a command first needs the server, so that local input (the token, a CSV file)
/// is checked and reported without dialling anything.
pub struct Server {
    addr: String,
    timeout: Duration,
    auth: BearerToken,
}

impl Server {
    pub fn new(cli: &Cli) -> Result<Self, CliError> {
        Ok(Self {
            addr: cli.addr.clone(),
            timeout: Duration::from_millis(cli.timeout_ms),
            auth: bearer_token(cli.token.as_deref())?,
        })
    }

    async fn channel(&self) -> Result<Channel, CliError> {
        let endpoint =
            Endpoint::from_shared(self.addr.clone()).map_err(|error| CliError::Address {
                addr: self.addr.clone(),
                message: error_chain(&error),
            })?;
        endpoint
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(self.timeout)
            .connect()
            .await
            .map_err(|error| CliError::Connect {
                addr: self.addr.clone(),
                message: error_chain(&error),
            })
    }

    pub async fn admin(&self) -> Result<AdminClient, CliError> {
        let channel = self.channel().await?;
        Ok(QuotaAdminClient::with_interceptor(
            channel,
            self.auth.clone(),
        ))
    }

    pub async fn gate(&self) -> Result<GateClient, CliError> {
        let channel = self.channel().await?;
        Ok(QuotaGateClient::with_interceptor(
            channel,
            self.auth.clone(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use tonic::service::Interceptor;

    use super::*;

    #[test]
    fn a_token_becomes_a_bearer_header() {
        let mut auth = bearer_token(Some("abc.def-ghi")).unwrap();
        let request = auth.call(tonic::Request::new(())).unwrap();
        let header = request.metadata().get("authorization").unwrap();
        assert_eq!(header.to_str().unwrap(), "Bearer abc.def-ghi");

        let mut no_auth = bearer_token(None).unwrap();
        let request = no_auth.call(tonic::Request::new(())).unwrap();
        assert!(request.metadata().get("authorization").is_none());
    }

    #[test]
    fn bad_tokens_are_refused_with_exit_code_2() {
        for token in ["", "two words", "line\nbreak", "caf\u{e9}"] {
            let error = bearer_token(Some(token)).unwrap_err();
            assert_eq!(error.exit_code(), 2, "{token:?}");
            assert!(!error.to_string().contains(token) || token.is_empty());
        }
    }
}
