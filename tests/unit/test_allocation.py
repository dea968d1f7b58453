"""Pod address and subnet allocation against the real sqlite store: no duplicates, even
from racing processes, and a clear error when the space runs out."""
import multiprocessing as mp

import pytest

from ctl.state import cluster
from ctl.errors import AtomnetError
from ctl.state.model import NetworkConfig
from ctl.state.store import open_store


@pytest.fixture
def store(tmp_path):
    s = open_store(f"sqlite://{tmp_path}/state.db")
    yield s
    s.close()


def _allocate(url, subnet, owner, count, out):
    s = open_store(url)
    got = [cluster.allocate_address(s, subnet, f"{owner}-{i}") for i in range(count)]
    s.close()
    out.put(got)


def test_addresses_skip_network_node_and_broadcast(store):
    got = [cluster.allocate_address(store, "10.244.1.0/29", f"p{i}") for i in range(5)]
    assert got == ["10.244.1.2", "10.244.1.3", "10.244.1.4", "10.244.1.5", "10.244.1.6"]
    with pytest.raises(AtomnetError, match="no free pod address left in 10.244.1.0/29"):
        cluster.allocate_address(store, "10.244.1.0/29", "one-too-many")


def test_released_address_is_reused_and_only_by_its_owner(store):
    ip = cluster.allocate_address(store, "10.244.1.0/24", "a")
    cluster.release_address(store, ip, "somebody-else")
    assert cluster.allocate_address(store, "10.244.1.0/24", "b") != ip
    cluster.release_address(store, ip, "a")
    assert cluster.allocate_address(store, "10.244.1.0/24", "c") == ip


def test_concurrent_processes_never_get_the_same_address(tmp_path):
    url = f"sqlite://{tmp_path}/state.db"
    open_store(url).close()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_allocate, args=(url, "10.244.7.0/24", f"w{i}", 10, out)) for i in range(6)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(10)
    flat = [ip for r in results for ip in r]
    assert len(flat) == 60 and len(set(flat)) == 60


def test_subnet_leases_are_unique_and_reused_by_public_ip(store):
    cfg = NetworkConfig(network="10.244.0.0/22", subnet_len=24)  # subnets 1..3 (flannel skips the first)
    leases = [cluster.acquire_subnet(store, cfg, f"192.168.100.{i}", "02:00:00:00:00:01")[0] for i in (1, 2, 3)]
    assert sorted(lease.subnet for lease in leases) == ["10.244.1.0/24", "10.244.2.0/24", "10.244.3.0/24"]
    again, _ = cluster.acquire_subnet(store, cfg, "192.168.100.2", "02:00:00:00:00:01")
    assert again.subnet == leases[1].subnet
    with pytest.raises(AtomnetError, match="subnet space exhausted"):
        cluster.acquire_subnet(store, cfg, "192.168.100.9", "02:00:00:00:00:01")


def test_lease_is_written_in_flannel_format(store):
    import json
    cfg = NetworkConfig(network="10.244.0.0/16")
    lease, lease_id = cluster.acquire_subnet(store, cfg, "192.168.100.1", "02:11:22:33:44:55", ttl=60)
    kv = store.get(f"/coreos.com/network/subnets/{lease.subnet.replace('/', '-')}")
    doc = json.loads(kv.value)
    assert doc["PublicIP"] == "192.168.100.1" and doc["BackendType"] == "vxlan"
    assert doc["BackendData"] == {"VNI": 1, "VtepMAC": "02:11:22:33:44:55"}
    assert kv.lease == lease_id and 0 < store.lease_ttl(lease_id) <= 60


def test_network_init_is_idempotent_and_refuses_a_different_cidr(store):
    cluster.init_network(store, "10.244.0.0/16", 24, "10.96.0.0/12")
    rev = store.revision()
    cluster.init_network(store, "10.244.0.0/16", 24, "10.96.0.0/12")
    assert store.revision() == rev, "the same config again writes nothing"
    with pytest.raises(AtomnetError, match="already initialised with 10.244.0.0/16"):
        cluster.init_network(store, "10.245.0.0/16", 24, "10.96.0.0/12")
    assert store.revision() == rev
    assert cluster.load_network(store).network == "10.244.0.0/16"


def test_malformed_leases_are_skipped_and_the_rest_kept(store):
    cfg, _ = cluster.init_network(store, "10.244.0.0/16", 24, "10.96.0.0/12")   # leases are checked against it
    good, _ = cluster.acquire_subnet(store, cfg, "192.168.100.1", "02:00:00:00:00:01")
    # two subnets other than the one good drew at random (it may draw 10.244.77.0/24 too)
    bad = [s for s in ("10.244.77.0/24", "10.244.78.0/24", "10.244.79.0/24") if s != good.subnet][:2]
    store.put(f"/coreos.com/network/subnets/{bad[0].replace('/', '-')}", "{not json")
    store.put(f"/coreos.com/network/subnets/{bad[1].replace('/', '-')}", '{"PublicIP": "not-an-ip"}')
    leases = [lease for lease, _ in cluster.list_leases(store)]
    assert leases == [good]
    # A malformed subnet is never handed out either: its key is taken.
    for _ in range(20):
        lease, _ = cluster.acquire_subnet(store, cfg, f"192.168.101.{_ + 1}", "02:00:00:00:00:02")
        assert lease.subnet not in bad


def test_flannel_config_fields_and_backend_check():
    cfg = NetworkConfig.from_json('{"Network": "10.1.0.0/16", "SubnetLen": 26, "SubnetMin": "10.1.0.64",'
                                  ' "SubnetMax": "10.1.1.0", "Backend": {"Type": "vxlan", "VNI": 4, "Port": 4789}}')
    assert (cfg.subnet_len, cfg.vni, cfg.port) == (26, 4, 4789)
    assert [str(s) for s in cfg.subnets()] == ["10.1.0.64/26", "10.1.0.128/26", "10.1.0.192/26", "10.1.1.0/26"]
    with pytest.raises(AtomnetError, match="not supported"):
        NetworkConfig.from_json('{"Network": "10.1.0.0/16", "Backend": {"Type": "host-gw"}}')


def test_requested_address_is_honoured_when_free_and_in_the_subnet(store):
    assert cluster.allocate_address(store, "10.244.1.0/24", "a", requested="10.244.1.77") == "10.244.1.77"
    assert cluster.allocate_address(store, "10.244.1.0/24", "b") == "10.244.1.2"   # the lowest free is unaffected
    with pytest.raises(AtomnetError, match=r"10.244.1.77 is already in use \(taken by a"):
        cluster.allocate_address(store, "10.244.1.0/24", "c", requested="10.244.1.77")
    for bad in ("10.244.2.5", "10.244.1.1", "10.244.1.255", "10.244.1.0", "nonsense"):
        with pytest.raises(AtomnetError):
            cluster.allocate_address(store, "10.244.1.0/24", "d", requested=bad)
    kvs, _ = store.list("/atomnet/ipam/")
    assert sorted(kv.value for kv in kvs) == ["a", "b"]   # failed requests claimed nothing
