//! `fake-qubitro`: the fake Qubitro API as a standalone server, for firmware work without an
//! account, the docker-compose scenario, the nspawn test and the benchmark.
//!
//! Scripts wait for the single `fake-qubitro listening on …` line on stdout; everything else
//! (one line per request) goes to stderr. Non-Rust users steer it through `/_fake/*`.

use std::io::{IsTerminal as _, Write as _};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use fake_qubitro::{CredentialsAt, Envelope, FakeOptions, FakeQubitro, ListShape};

/// Fake Qubitro REST API (devices: create, list, get, delete) with fault injection.
///
/// Control endpoints, without auth: GET /_fake/devices, GET /_fake/stats,
/// POST /_fake/faults {"endpoint":"create","faults":[{"status":500},{"status":429,"retry_after":2},
/// {"delay_ms":3000},{"created_then_status":500},{"created_then_hang":true},{"not_found":true},
/// {"hang":true}]}, POST /_fake/options {"list_shape":"devices_key","list_page_size":2,
/// "list_ignores_filter":true,"list_newest_first":false,"created_at_field":true,
/// "delete_permission":false,"hold_creates":true} (each optional; page size 0 turns pagination
/// off; held creates wait for "hold_creates":false), POST /_fake/reset.
#[derive(Parser, Debug)]
#[command(name = "fake-qubitro", version)]
struct Args {
    /// Address to listen on (port 0 picks a free one; the chosen one is printed).
    #[arg(long, env = "FAKE_QUBITRO_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,

    /// API key clients must send as `Authorization: Bearer <key>`.
    #[arg(
        long,
        env = "FAKE_QUBITRO_API_KEY",
        hide_env_values = true,
        value_parser = clap::builder::NonEmptyStringValueParser::new()
    )]
    api_key: String,

    /// The one project that exists; other ids answer 404.
    #[arg(
        long,
        env = "FAKE_QUBITRO_PROJECT_ID",
        value_parser = clap::builder::NonEmptyStringValueParser::new()
    )]
    project_id: String,

    /// Response shape: wrapped in {success,action,status,message,data} or the bare object.
    #[arg(
        long,
        env = "FAKE_QUBITRO_ENVELOPE",
        value_enum,
        default_value = "wrapped"
    )]
    envelope: EnvelopeArg,

    /// Where the create response carries the device credentials.
    #[arg(
        long,
        env = "FAKE_QUBITRO_CREDENTIALS_AT",
        value_enum,
        default_value = "device_credentials"
    )]
    credentials_at: CredentialsAtArg,

    /// Status of a successful create (the docs say 201, some say 200).
    #[arg(
        long,
        env = "FAKE_QUBITRO_CREATE_STATUS",
        default_value_t = 201,
        value_parser = clap::value_parser!(u16).range(200..300)
    )]
    create_status: u16,

    /// Delay added to every answer, in milliseconds.
    #[arg(long, env = "FAKE_QUBITRO_DELAY_MS", default_value_t = 0)]
    delay_ms: u64,

    /// Layout of list answers (only `standard` is what the documentation shows).
    #[arg(
        long,
        env = "FAKE_QUBITRO_LIST_SHAPE",
        value_enum,
        default_value = "standard"
    )]
    list_shape: ListShapeArg,

    /// Paginate list answers with this many items per page (query `page`, 1-based).
    #[arg(long, env = "FAKE_QUBITRO_LIST_PAGE_SIZE", value_parser = clap::value_parser!(u64).range(1..))]
    list_page_size: Option<u64>,

    /// The list ignores its `?metadata=` filter and answers every device.
    #[arg(long, env = "FAKE_QUBITRO_LIST_IGNORES_FILTER")]
    list_ignores_filter: bool,

    /// List oldest first (the documented order is newest first).
    #[arg(long, env = "FAKE_QUBITRO_LIST_OLDEST_FIRST")]
    list_oldest_first: bool,

    /// Add a `created_at` field to device objects (the real docs show none).
    #[arg(long, env = "FAKE_QUBITRO_CREATED_AT_FIELD")]
    created_at_field: bool,

    /// The API key lacks the Delete permission: every delete answers 403.
    #[arg(long, env = "FAKE_QUBITRO_NO_DELETE_PERMISSION")]
    no_delete_permission: bool,

    /// Do not log each request (benchmarks: stderr would become the bottleneck).
    #[arg(long, env = "FAKE_QUBITRO_QUIET")]
    quiet: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum EnvelopeArg {
    Wrapped,
    Bare,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
#[value(rename_all = "snake_case")]
enum ListShapeArg {
    Standard,
    DevicesKey,
    ItemsKey,
    Unrecognised,
    NoMetadata,
    SensorIdUnderOtherKey,
}

impl From<ListShapeArg> for ListShape {
    fn from(a: ListShapeArg) -> Self {
        match a {
            ListShapeArg::Standard => ListShape::Standard,
            ListShapeArg::DevicesKey => ListShape::DevicesKey,
            ListShapeArg::ItemsKey => ListShape::ItemsKey,
            ListShapeArg::Unrecognised => ListShape::Unrecognised,
            ListShapeArg::NoMetadata => ListShape::NoMetadata,
            ListShapeArg::SensorIdUnderOtherKey => ListShape::SensorIdUnderOtherKey,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum CredentialsAtArg {
    #[value(name = "device_credentials", alias = "device-credentials")]
    DeviceCredentials,
    Metadata,
    /// Only the new device's id: clients must GET its credentials.
    Absent,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let filter = if args.quiet { "warn" } else { "info" };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter)),
        )
        .init();

    let opts = FakeOptions {
        bind: args.listen,
        api_key: args.api_key,
        project_id: args.project_id,
        envelope: match args.envelope {
            EnvelopeArg::Wrapped => Envelope::Wrapped,
            EnvelopeArg::Bare => Envelope::Bare,
        },
        credentials_at: match args.credentials_at {
            CredentialsAtArg::DeviceCredentials => CredentialsAt::DeviceCredentials,
            CredentialsAtArg::Metadata => CredentialsAt::Metadata,
            CredentialsAtArg::Absent => CredentialsAt::Absent,
        },
        create_status: args.create_status,
        delay: Duration::from_millis(args.delay_ms),
        tls: None,
        control_endpoints: true,
        list_shape: args.list_shape.into(),
        list_page_size: args
            .list_page_size
            .map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
        list_ignores_filter: args.list_ignores_filter,
        list_newest_first: !args.list_oldest_first,
        created_at_field: args.created_at_field,
        delete_permission: !args.no_delete_permission,
    };
    let fake = match FakeQubitro::start(opts).await {
        Ok(fake) => fake,
        Err(e) => {
            eprintln!("fake-qubitro: cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };

    {
        // Scripts block on this line, so it must leave the pipe buffer now, not at exit.
        let mut out = std::io::stdout().lock();
        let printed = writeln!(
            out,
            "fake-qubitro listening on {} (project {})",
            fake.base_url(),
            fake.project_id()
        )
        .and_then(|()| out.flush());
        if let Err(e) = printed {
            eprintln!("fake-qubitro: cannot write to stdout: {e}");
            return ExitCode::FAILURE;
        }
    }

    match shutdown_signal().await {
        Ok(name) => tracing::info!("{name} received, stopping"),
        Err(e) => {
            eprintln!("fake-qubitro: cannot wait for signals: {e}");
            fake.stop().await;
            return ExitCode::FAILURE;
        }
    }
    fake.stop().await;
    ExitCode::SUCCESS
}

async fn shutdown_signal() -> std::io::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}
