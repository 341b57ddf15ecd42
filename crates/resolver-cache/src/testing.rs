//! An in-process authoritative DNS server for tests (feature `testing`): serves a zone
//! given as zone-file text on 127.0.0.1 over UDP and TCP, counts queries per name and type,
//! and can be scripted to answer SERVFAIL or to answer slowly. The resolver's own tests and
//! the engine's end-to-end tests use it, so neither depends on a system resolver.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Header, HeaderCounts, Metadata, ResponseCode};
pub use hickory_server::proto::rr::RecordType;
use hickory_server::proto::rr::{rdata::MX, LowerName, Name, RData, Record, RecordSet, RrKey};
use hickory_server::proto::serialize::txt::Parser;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{
    AxfrPolicy, Catalog, MessageResponseBuilder, ZoneHandler, ZoneType,
};
use hickory_server::Server;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Scripted behaviour and observations, shared between the test and the server.
#[derive(Default)]
struct Script {
    counts: Mutex<HashMap<(String, RecordType), usize>>,
    servfail: Mutex<HashSet<String>>,
    delay: Mutex<HashMap<String, Duration>>,
    /// Queries being answered now, and the most there ever were at once.
    concurrent: Mutex<(usize, usize)>,
}

struct Counting {
    catalog: Catalog,
    script: Arc<Script>,
}

#[async_trait::async_trait]
impl RequestHandler for Counting {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        if let Ok(info) = request.request_info() {
            let name = info
                .query
                .name()
                .to_string()
                .trim_end_matches('.')
                .to_ascii_lowercase();
            let qtype = info.query.query_type();
            *self
                .script
                .counts
                .lock()
                .unwrap()
                .entry((name.clone(), qtype))
                .or_default() += 1;
            let delay = self.script.delay.lock().unwrap().get(&name).copied();
            if let Some(delay) = delay {
                {
                    let mut c = self.script.concurrent.lock().unwrap();
                    c.0 += 1;
                    c.1 = c.1.max(c.0);
                }
                tokio::time::sleep(delay).await;
                self.script.concurrent.lock().unwrap().0 -= 1;
            }
            if self.script.servfail.lock().unwrap().contains(&name) {
                let response = MessageResponseBuilder::from_message_request(request)
                    .error_msg(&request.metadata, ResponseCode::ServFail);
                let mut metadata = Metadata::response_from_request(&request.metadata);
                metadata.response_code = ResponseCode::ServFail;
                let fallback = ResponseInfo::from(Header {
                    metadata,
                    counts: HeaderCounts::default(),
                });
                return response_handle
                    .send_response(response)
                    .await
                    .unwrap_or(fallback);
            }
        }
        self.catalog
            .handle_request::<R, T>(request, response_handle)
            .await
    }
}

/// A running test name server; it stops when dropped.
pub struct TestDns {
    /// Where it listens (UDP and TCP).
    pub addr: SocketAddr,
    script: Arc<Script>,
    zone: Arc<InMemoryZoneHandler>,
    _server: Server<Counting>,
}

impl TestDns {
    /// Serves `zone` (zone-file text) for `origin` (e.g. "example.test."). Panics on a bad
    /// zone: this is test code.
    pub async fn start(zone: &str, origin: &str) -> TestDns {
        let origin = Name::from_str(origin).unwrap();
        let (origin, records) = Parser::new(zone, None, Some(origin)).parse().unwrap();
        let zone: InMemoryZoneHandler =
            InMemoryZoneHandler::new(origin.clone(), records, ZoneType::Primary, AxfrPolicy::Deny)
                .unwrap();
        let zone = Arc::new(zone);
        let mut catalog = Catalog::new();
        catalog.upsert(
            LowerName::from(&origin),
            vec![Arc::clone(&zone) as Arc<dyn ZoneHandler>],
        );
        let script = Arc::new(Script::default());
        let mut server = Server::new(Counting {
            catalog,
            script: Arc::clone(&script),
        });
        // UDP and TCP on one port, as a real name server has; retry if another test took the
        // TCP side of the free UDP port meanwhile.
        let (udp, tcp) = loop {
            let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let port = udp.local_addr().unwrap().port();
            if let Ok(tcp) = tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
                break (udp, tcp);
            }
        };
        let addr = udp.local_addr().unwrap();
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(5), 64);
        TestDns {
            addr,
            script,
            zone,
            _server: server,
        }
    }

    /// Queries seen for `name` (lower-case, no trailing dot) and type.
    pub fn count(&self, name: &str, qtype: RecordType) -> usize {
        self.script
            .counts
            .lock()
            .unwrap()
            .get(&(name.to_owned(), qtype))
            .copied()
            .unwrap_or(0)
    }

    /// Queries seen in all.
    pub fn total_queries(&self) -> usize {
        self.script.counts.lock().unwrap().values().sum()
    }

    /// Answers SERVFAIL for `name` from now on.
    pub fn servfail(&self, name: &str) {
        self.script.servfail.lock().unwrap().insert(name.to_owned());
    }

    /// The most delayed queries (see [`TestDns::delay`]) that were being answered at once.
    pub fn max_concurrent_delayed(&self) -> usize {
        self.script.concurrent.lock().unwrap().1
    }

    /// Answers queries for `name` only after `delay`.
    pub fn delay(&self, name: &str, delay: Duration) {
        self.script
            .delay
            .lock()
            .unwrap()
            .insert(name.to_owned(), delay);
    }

    /// Replaces the whole MX set of `name`.
    pub async fn set_mx(&self, name: &str, ttl: u32, mx: &[(u16, &str)]) {
        let owner = Name::from_str(name).unwrap();
        let mut set = RecordSet::new(owner.clone(), RecordType::MX, 2);
        for &(preference, exchange) in mx {
            let rdata = RData::MX(MX::new(preference, Name::from_str(exchange).unwrap()));
            set.insert(Record::from_rdata(owner.clone(), ttl, rdata), 2);
        }
        self.zone.records_mut().await.insert(
            RrKey::new(LowerName::from(&owner), RecordType::MX),
            Arc::new(set),
        );
    }
}
