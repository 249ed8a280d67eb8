//! What a fake is started with: the documented answer forms to choose between, and the four
//! device calls that faults and counters are kept for.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::shapes::{ListOptions, ListShape};
use crate::{DEFAULT_API_KEY, DEFAULT_PROJECT_ID};

/// Response shape: the older docs and the Node SDK wrap everything, the newest docs do not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Envelope {
    /// `{"success":…,"action":…,"status":…,"message":…,"data":…}`; errors without `data`.
    #[default]
    Wrapped,
    /// The object itself; errors are `{"message":…}`.
    Bare,
}

/// Where the create response carries the new device's credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CredentialsAt {
    /// `data.device_credentials.{device_id,device_token}`; `data.metadata` is the user's own.
    #[default]
    DeviceCredentials,
    /// `data.metadata` is the user's metadata plus `device_id` and `device_token`.
    Metadata,
    /// No credentials at all, only the new device's `id`: the client must GET the device
    /// (the read-after-write path).
    Absent,
}

/// Configuration of a [`FakeQubitro`](crate::FakeQubitro).
#[derive(Debug, Clone)]
pub struct FakeOptions {
    /// Port 0 picks a free port; read it back with [`FakeQubitro::addr`](crate::FakeQubitro::addr).
    pub bind: SocketAddr,
    pub api_key: String,
    /// The only project that exists; any other id is 404.
    pub project_id: String,
    pub envelope: Envelope,
    pub credentials_at: CredentialsAt,
    /// Status of a successful create: 201, or 200 as some docs say.
    pub create_status: u16,
    /// Added to every answer (initial value; see [`FakeQubitro::set_delay`](crate::FakeQubitro::set_delay)).
    pub delay: Duration,
    /// Serve HTTPS with this certificate instead of plain HTTP (the TLS path of the
    /// daemon's cloud client is tested against it).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Serve the unauthenticated `/_fake/*` control endpoints (for the standalone binary;
    /// in-process tests have the Rust API instead, and the real cloud has no such paths).
    pub control_endpoints: bool,
    /// Layout of list answers (initial value; see [`FakeQubitro::set_list_shape`](crate::FakeQubitro::set_list_shape)).
    pub list_shape: ListShape,
    /// Paginate list answers with this many items per page, selected by the query parameter
    /// `page` (1-based, default 1). Wrapped answers add `"page"`, `"limit"`, `"total"` and
    /// `"total_pages"` next to `"data"`; bare ones become
    /// `{"items":[…],"page":N,"limit":L,"total":T,"total_pages":P}`. A page past the end is
    /// an empty array with the same fields. `None`: one answer with every match.
    pub list_page_size: Option<usize>,
    /// The list ignores `?metadata=` and answers every device (an API that dropped the filter).
    pub list_ignores_filter: bool,
    /// Order of list items: newest first, as Qubitro documents, or oldest first.
    pub list_newest_first: bool,
    /// Add a `"created_at"` RFC 3339 field to list items and GET answers (the real docs show
    /// none, so off by default).
    pub created_at_field: bool,
    /// The API key holds Qubitro's Delete permission (initial value; see
    /// [`FakeQubitro::set_delete_permission`](crate::FakeQubitro::set_delete_permission)).
    /// Without it every delete answers 403, as Qubitro does for such a key.
    pub delete_permission: bool,
}

impl Default for FakeOptions {
    fn default() -> Self {
        FakeOptions {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            api_key: DEFAULT_API_KEY.to_owned(),
            project_id: DEFAULT_PROJECT_ID.to_owned(),
            envelope: Envelope::default(),
            credentials_at: CredentialsAt::default(),
            create_status: 201,
            delay: Duration::ZERO,
            control_endpoints: false,
            tls: None,
            list_shape: ListShape::Standard,
            list_page_size: None,
            list_ignores_filter: false,
            list_newest_first: true,
            created_at_field: false,
            delete_permission: true,
        }
    }
}

impl ListOptions {
    pub(crate) fn of(opts: &FakeOptions) -> Self {
        ListOptions {
            shape: opts.list_shape,
            page_size: opts.list_page_size,
            ignores_filter: opts.list_ignores_filter,
            newest_first: opts.list_newest_first,
            created_at_field: opts.created_at_field,
        }
    }
}

/// The four documented device calls; faults and counters are kept per endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Endpoint {
    Create,
    List,
    Get,
    Delete,
}

impl Endpoint {
    pub(crate) const ALL: [Endpoint; 4] = [
        Endpoint::Create,
        Endpoint::List,
        Endpoint::Get,
        Endpoint::Delete,
    ];

    pub(crate) fn index(self) -> usize {
        self as usize
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Endpoint::Create => "create",
            Endpoint::List => "list",
            Endpoint::Get => "get",
            Endpoint::Delete => "delete",
        }
    }
}
