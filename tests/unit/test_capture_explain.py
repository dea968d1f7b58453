"""The e2e tests' failure evidence (tests/e2e/capture.py): a SYN sent twice is found by its
sequence number on both sides of the masquerade, with the translated tuple's history."""
from tests.bench.crr import parse_counters
from tests.e2e.capture import explain_syn_retransmissions, retransmitted_syns

POD = [
    "100.000001 IP 10.244.1.3.40000 > 10.99.0.3.5201: Flags [S], seq 111, win 64240, length 0",
    "100.000002 IP 10.244.1.3.40002 > 10.99.0.3.5201: Flags [S], seq 222, win 64240, length 0",
    "101.020000 IP 10.244.1.3.40002 > 10.99.0.3.5201: Flags [S], seq 222, win 64240, length 0",
]
SERVER = [
    "40.000000 IP 10.99.0.1.61500 > 10.99.0.3.5201: Flags [F.], seq 9, ack 9, win 500, length 0",
    "100.000100 IP 10.99.0.1.61001 > 10.99.0.3.5201: Flags [S], seq 111, win 64240, length 0",
    "100.000200 IP 10.99.0.1.61500 > 10.99.0.3.5201: Flags [S], seq 222, win 64240, length 0",
    "100.000300 IP 10.99.0.3.5201 > 10.99.0.1.61500: Flags [.], ack 10, win 500, length 0",
    "101.020100 IP 10.99.0.1.61500 > 10.99.0.3.5201: Flags [S], seq 222, win 64240, length 0",
    "101.020200 IP 10.99.0.3.5201 > 10.99.0.1.61500: Flags [S.], seq 777, ack 223, win 65160, length 0",
]


def test_a_syn_sent_twice_is_found_with_its_translated_tuples_history():
    assert list(retransmitted_syns(POD)) == ["222"]
    said = explain_syn_retransmissions(POD, SERVER)
    assert "SYN seq 222 sent 2x" in said and "seq 111" not in said
    # the old connection's FIN on the same node port, then the challenge ACK, are in the history
    assert SERVER[0] in said and SERVER[3] in said and SERVER[5] in said


def test_nothing_to_explain_says_so():
    assert explain_syn_retransmissions(POD[:2], SERVER) == "no SYN sent twice in the client's capture"


def test_counters_are_read_as_name_value_pairs_per_protocol():
    text = "TcpExt: SyncookiesSent TCPSynRetrans\nTcpExt: 0 7\nIpExt: InNoRoutes\nIpExt: 3\n"
    assert parse_counters(text) == {"TcpExt.SyncookiesSent": 0, "TcpExt.TCPSynRetrans": 7, "IpExt.InNoRoutes": 3}
