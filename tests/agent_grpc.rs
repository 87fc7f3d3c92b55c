//! The agent's gRPC contract over real TCP with the simulated backend: replies, error codes, and that a refused
//! request changes nothing.

mod common;

use common::SimAgent;
use tonic::Code;
use vcpu_balancer::pb;
use vcpu_balancer::pb::agent_client::AgentClient;

const SCENARIO: &str = common::SMALL_HOST;

async fn setup() -> (SimAgent, AgentClient<tonic::transport::Channel>) {
    let agent = SimAgent::start(&common::scenario(SCENARIO), 1.0).await;
    let client = AgentClient::connect(format!("http://{}", agent.addr)).await.unwrap();
    (agent, client)
}

fn pin(domain: &str, vcpu: u32, pcpus: &[u32]) -> pb::PinVcpuRequest {
    pb::PinVcpuRequest { domain: domain.into(), vcpu, pcpus: pcpus.to_vec(), persist: false }
}

async fn affinity(c: &mut AgentClient<tonic::transport::Channel>, domain: &str) -> Vec<Vec<u32>> {
    let p = c.get_vcpu_placement(pb::GetVcpuPlacementRequest { domain: domain.into() }).await.unwrap().into_inner();
    p.vcpus.into_iter().map(|v| v.affinity).collect()
}

/// GetHostInfo, ListDomains, GetStats and GetVcpuPlacement describe the simulated host.
#[tokio::test]
async fn read_rpcs_describe_the_host() {
    let (agent, mut c) = setup().await;
    let info = c.get_host_info(pb::GetHostInfoRequest {}).await.unwrap().into_inner();
    assert_eq!((info.backend.as_str(), info.npcpus, info.online_pcpus.clone()), ("sim", 4, vec![0, 1, 2, 3]));
    assert_eq!(info.agent_version, vcpu_balancer::VERSION);

    let doms = c.list_domains(pb::ListDomainsRequest {}).await.unwrap().into_inner().domains;
    let names: Vec<(&str, u32, &str)> = doms.iter().map(|d| (d.name.as_str(), d.vcpus, d.state.as_str())).collect();
    assert_eq!(names, vec![("vm1", 2, "running"), ("vm2", 1, "running")]);

    let a = c.get_stats(pb::GetStatsRequest {}).await.unwrap().into_inner();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let b = c.get_stats(pb::GetStatsRequest {}).await.unwrap().into_inner();
    assert!(b.sample_time_ns > a.sample_time_ns);
    assert_eq!(a.agent_instance, b.agent_instance);
    assert!(!a.agent_instance.is_empty());
    let vm1 = &b.domains[0];
    assert_eq!((vm1.name.as_str(), vm1.vcpus.len()), ("vm1", 2));
    assert_eq!(vm1.vcpus[0].affinity, vec![0]);
    assert!(vm1.vcpus[0].time_ns > a.domains[0].vcpus[0].time_ns, "vCPU time advances");
    assert_eq!(vm1.cpu_time_ns, vm1.vcpus.iter().map(|v| v.time_ns).sum::<u64>());
    // vm2 is unpinned: affinity is every pCPU.
    assert_eq!(b.domains[1].vcpus[0].affinity, vec![0, 1, 2, 3]);

    // By name and by UUID.
    let by_uuid = c
        .get_vcpu_placement(pb::GetVcpuPlacementRequest { domain: vm1.uuid.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_uuid.domain, "vm1");
    agent.stop().await;
}

/// A pin takes effect at once and shows in GetVcpuPlacement and GetStats.
#[tokio::test]
async fn pin_vcpu_applies() {
    let (agent, mut c) = setup().await;
    c.pin_vcpu(pin("vm1", 1, &[3])).await.unwrap();
    assert_eq!(affinity(&mut c, "vm1").await, vec![vec![0], vec![3]]);
    let s = c.get_stats(pb::GetStatsRequest {}).await.unwrap().into_inner();
    assert_eq!(s.domains[0].vcpus[1].pcpu, 3);
    // A list of pCPUs is an affinity, not a single pin.
    c.pin_vcpu(pin("vm2", 0, &[1, 2])).await.unwrap();
    assert_eq!(affinity(&mut c, "vm2").await, vec![vec![1, 2]]);
    agent.stop().await;
}

/// Every bad input gets its code and changes nothing.
#[tokio::test]
async fn bad_pins_are_refused_and_change_nothing() {
    let (agent, mut c) = setup().await;
    let before = (affinity(&mut c, "vm1").await, affinity(&mut c, "vm2").await);
    let cases = [
        (pin("nope", 0, &[1]), Code::NotFound),
        (pin("vm1", 2, &[1]), Code::InvalidArgument),
        (pin("vm1", 0, &[4]), Code::InvalidArgument),
        (pin("vm1", 0, &[]), Code::InvalidArgument),
        (pin("", 0, &[1]), Code::InvalidArgument),
    ];
    for (req, code) in cases {
        let err = c.pin_vcpu(req.clone()).await.unwrap_err();
        assert_eq!(err.code(), code, "{req:?}: {}", err.message());
        assert!(!err.message().is_empty());
    }
    let err = c.get_vcpu_placement(pb::GetVcpuPlacementRequest { domain: "nope".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!((affinity(&mut c, "vm1").await, affinity(&mut c, "vm2").await), before);
    agent.stop().await;
}

/// A batch with one invalid pin is refused whole; a pin to an unknown domain fails alone.
#[tokio::test]
async fn apply_pins_batch_semantics() {
    let (agent, mut c) = setup().await;
    let err = c
        .apply_pins(pb::ApplyPinsRequest { pins: vec![pin("vm2", 0, &[2]), pin("vm1", 0, &[9])] })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("pCPU 9"), "{}", err.message());
    assert_eq!(affinity(&mut c, "vm2").await, vec![vec![0, 1, 2, 3]], "the valid pin was not applied");

    let r = c
        .apply_pins(pb::ApplyPinsRequest { pins: vec![pin("gone", 0, &[1]), pin("vm2", 0, &[2]), pin("vm1", 1, &[1])] })
        .await
        .unwrap()
        .into_inner()
        .results;
    let codes: Vec<i32> = r.iter().map(|x| x.code).collect();
    assert_eq!(codes, vec![Code::NotFound as i32, 0, 0]);
    assert!(r[0].message.contains("gone"));
    assert_eq!(affinity(&mut c, "vm2").await, vec![vec![2]]);
    assert_eq!(affinity(&mut c, "vm1").await, vec![vec![0], vec![1]]);
    agent.stop().await;
}

/// A hypervisor that cannot be reached answers UNAVAILABLE, and works again when it is back.
#[tokio::test]
async fn unreachable_hypervisor_is_unavailable() {
    let (agent, mut c) = setup().await;
    agent.hv.set_unavailable(true);
    assert_eq!(c.get_stats(pb::GetStatsRequest {}).await.unwrap_err().code(), Code::Unavailable);
    assert_eq!(c.pin_vcpu(pin("vm1", 0, &[1])).await.unwrap_err().code(), Code::Unavailable);
    agent.hv.set_unavailable(false);
    assert!(c.get_stats(pb::GetStatsRequest {}).await.is_ok());
    assert_eq!(affinity(&mut c, "vm1").await, vec![vec![0], vec![0]]);
    agent.stop().await;
}

/// gRPC health says SERVING and reflection lists the Agent service (what `grpcurl list` uses).
#[tokio::test]
async fn health_and_reflection_are_served() {
    use tokio_stream::StreamExt;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let (agent, _c) = setup().await;
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", agent.addr)).unwrap().connect().await.unwrap();
    let mut health = HealthClient::new(ch.clone());
    let st = health.check(HealthCheckRequest { service: "vcpu.v1.Agent".into() }).await.unwrap().into_inner();
    assert_eq!(st.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);

    let mut refl = ServerReflectionClient::new(ch);
    let req = ServerReflectionRequest { host: String::new(), message_request: Some(MessageRequest::ListServices(String::new())) };
    let mut stream = refl.server_reflection_info(tokio_stream::once(req)).await.unwrap().into_inner();
    let resp = stream.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else { panic!("unexpected reply") };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"vcpu.v1.Agent".to_string()), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health".to_string()), "{names:?}");
    agent.stop().await;
}

/// A request over the agent's decoding limit is refused by the transport (OUT_OF_RANGE) before any handler runs, and
/// changes nothing.
#[tokio::test]
async fn oversized_requests_are_refused_unread() {
    let (_agent, mut c) = setup().await;
    let before = affinity(&mut c, "vm1").await;
    let big = "x".repeat(vcpu_balancer::agent::MAX_DECODING_MESSAGE_SIZE / 4);
    let pins = (0..5).map(|_| pin(&big, 0, &[1])).chain([pin("vm1", 0, &[3])]).collect();
    let e = c.apply_pins(pb::ApplyPinsRequest { pins }).await.unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e}");
    assert_eq!(affinity(&mut c, "vm1").await, before);
}

/// HTTP/2 frame types in `bytes`, a stream of whole frames.
fn frame_types(mut bytes: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    while bytes.len() >= 9 {
        let len = usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
        types.push(bytes[3]);
        bytes = &bytes[(9 + len).min(bytes.len())..];
    }
    types
}

/// A peer that goes silent (its host crashed, or the link was cut, so no FIN ever comes) does not keep its
/// connection open on the agent forever: after a quiet spell the agent pings it, and closes the connection when no
/// answer comes.
#[tokio::test]
async fn a_peer_that_never_answers_pings_is_disconnected() {
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use vcpu_balancer::hypervisor::sim::{ScaledClock, SimHypervisor};

    const PING: u8 = 6;
    let opts = vcpu_balancer::agent::ServeOptions {
        keepalive_interval: Duration::from_millis(200),
        keepalive_timeout: Duration::from_millis(200),
        ..Default::default()
    };
    let hv = Arc::new(SimHypervisor::new(&common::scenario(SCENARIO), "sim-ka", Arc::new(ScaledClock::new(1.0))));
    let agent = SimAgent::start_opts(hv, "127.0.0.1:0", opts).await;
    let mut sock = tokio::net::TcpStream::connect(&agent.addr).await.unwrap();
    // The client preface and an empty SETTINGS frame, then nothing ever again, not even an ACK.
    sock.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00").await.unwrap();
    // Far above the 0.4 s the agent should take: without keepalive it would never close, and this fails instead.
    let received = tokio::time::timeout(Duration::from_secs(30), async {
        let (mut got, mut buf) = (Vec::new(), [0u8; 4096]);
        while let Ok(n @ 1..) = sock.read(&mut buf).await {
            got.extend_from_slice(&buf[..n]);
        }
        got
    })
    .await
    .expect("the agent closes a connection whose peer never answers its pings");
    assert!(frame_types(&received).contains(&PING), "a ping came before the close: {:?}", frame_types(&received));
}

/// Bytes that are not the RPC's message: `domain` (field 1, a string) as bytes that are not UTF-8, `vcpu` (field 2,
/// a varint) sent as a string.
#[derive(Clone, PartialEq, prost::Message)]
struct NotAPin {
    #[prost(bytes = "vec", tag = "1")]
    domain: Vec<u8>,
    #[prost(string, optional, tag = "2")]
    vcpu: Option<String>,
}

/// A request body that does not decode is a malformed request: INVALID_ARGUMENT, as the API promises (tonic's codec
/// says INTERNAL, which reads as a fault of the agent), and nothing changes.
#[tokio::test]
async fn a_request_that_does_not_decode_is_invalid_argument() {
    let (agent, mut c) = setup().await;
    let before = affinity(&mut c, "vm1").await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", agent.addr)).unwrap();
    let channel = channel.connect().await.unwrap();
    let not_utf8 = NotAPin { domain: vec![0xff, 0xfe], vcpu: None };
    let wrong_wire_type = NotAPin { domain: b"vm1".to_vec(), vcpu: Some("0".into()) };
    for bad in [not_utf8, wrong_wire_type] {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.unwrap();
        let codec = tonic_prost::ProstCodec::<NotAPin, pb::PinVcpuResponse>::default();
        let path = http::uri::PathAndQuery::from_static("/vcpu.v1.Agent/PinVcpu");
        let e = grpc.unary(tonic::Request::new(bad.clone()), path, codec).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{bad:?}: {e:?}");
        assert!(e.message().contains("decode"), "{e:?}");
    }
    assert_eq!(affinity(&mut c, "vm1").await, before, "a request that did not decode changed nothing");
}
