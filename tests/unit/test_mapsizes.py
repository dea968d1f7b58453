"""The daemon's map-size flags (Cilium's --bpf-lb-map-max family): what each sets, the
environment fallback, and one clear line for a bad value."""
from __future__ import annotations

import pytest

from ctl.dataplane.mapsizes import MAX_SIZE, env_name, flag_for, lb_map_sizes
from ctl.errors import AtomnetError


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    for flag in ("--bpf-lb-map-max", "--bpf-lb-service-map-max", "--bpf-lb-service-backend-map-max",
                 "--bpf-lb-maglev-map-max"):
        monkeypatch.delenv(env_name(flag), raising=False)


def test_nothing_given_keeps_the_compiled_sizes():
    assert lb_map_sizes({}) == {}
    assert lb_map_sizes({"--bpf-lb-map-max": None}) == {}


def test_lb_map_max_sizes_every_service_map_backends_four_times():
    assert lb_map_sizes({"--bpf-lb-map-max": "131072"}) == {"services": 131072, "maglev": 131072,
                                                           "backends": 524288}


def test_a_per_map_flag_wins_over_lb_map_max():
    assert lb_map_sizes({"--bpf-lb-map-max": 1000, "--bpf-lb-service-backend-map-max": 9}) == {
        "services": 1000, "maglev": 1000, "backends": 9}
    assert lb_map_sizes({"--bpf-lb-maglev-map-max": "8"}) == {"maglev": 8}


def test_environment_variables_are_the_config_file_route(monkeypatch):
    assert env_name("--bpf-lb-service-map-max") == "ATOMNET_BPF_LB_SERVICE_MAP_MAX"
    monkeypatch.setenv("ATOMNET_BPF_LB_MAP_MAX", "70000")
    monkeypatch.setenv("ATOMNET_BPF_LB_SERVICE_MAP_MAX", "")   # empty: not set (an env file's `X=`)
    assert lb_map_sizes({}) == {"services": 70000, "maglev": 70000, "backends": 280000}
    assert lb_map_sizes({"--bpf-lb-map-max": "10"})["services"] == 10, "the flag wins over the environment"


@pytest.mark.parametrize("value", ["0", "-5", "lots", "1.5", str(MAX_SIZE + 1)])
def test_a_bad_size_is_one_line_naming_the_flag(value):
    with pytest.raises(AtomnetError) as err:
        lb_map_sizes({"--bpf-lb-service-map-max": value})
    assert str(err.value).startswith("invalid --bpf-lb-service-map-max ") and "\n" not in str(err.value)


def test_a_bad_environment_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("ATOMNET_BPF_LB_MAGLEV_MAP_MAX", "x")
    with pytest.raises(AtomnetError, match="invalid ATOMNET_BPF_LB_MAGLEV_MAP_MAX 'x'"):
        lb_map_sizes({})


def test_the_flag_to_raise_for_each_map():
    assert flag_for("backends") == "--bpf-lb-service-backend-map-max"
    assert flag_for("services") == "--bpf-lb-service-map-max"
    assert flag_for("maglev") == "--bpf-lb-maglev-map-max"
