"""Spec loading and validation: every bad input names the field and the value."""

import pytest
import yaml

from rebalance.spec import Spec, SpecError, Target


@pytest.fixture
def data_dir(tmp_path):
    (tmp_path / "data").mkdir()
    return str(tmp_path / "data")


def test_defaults_and_round_trip(data_dir, tmp_path):
    spec = Spec.from_dict({"data": {"path": data_dir}})
    assert spec.embed.model == "ViT-B-32" and spec.embed.pretrained == "openai"
    assert spec.cluster.image.k == "auto" and spec.cluster.spherical is True
    assert spec.balance.marginals == ("image_cluster", "text_cluster") and spec.balance.iterations == "auto"
    assert spec.balance.target == Target() and spec.ray.address == "auto" and spec.ray.listen == "loopback"
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec.to_dict()))
    assert Spec.from_yaml(path) == spec


def test_full_spec(data_dir):
    spec = Spec.from_dict(
        {
            "data": {"path": data_dir, "format": "parquet", "carry": ["source", "label"]},
            "embed": {"model": "rebalance-tiny", "pretrained": None, "workers": 2},
            "cluster": {"image": {"k": 8}, "text": {"k": 4}, "niter": 5},
            "balance": {
                "marginals": ["image_cluster", "source"],
                "target": {"cap": 100},
                "targets": {"source": {"weights": {"web": 1, "stock": 2}}},
                "iterations": 3,
            },
            "report": {"top_eigenvalues": 8},
            "ray": {"address": "local", "num_cpus": 2},
        }
    )
    assert spec.balance.target_for("image_cluster") == Target(kind="cap", value=100.0)
    assert spec.balance.target_for("source").value == {"web": 1.0, "stock": 2.0}
    assert spec.data.carry == ("source", "label") and spec.embed.workers == 2


@pytest.mark.parametrize(
    ("patch", "field", "shown"),
    [
        ({"cluster": {"image": {"k": 0}}}, "cluster.image.k", "0"),
        ({"cluster": {"text": {"k": "many"}}}, "cluster.text.k", "'many'"),
        ({"balance": {"tol": -1e-6}}, "balance.tol", "-1e-06"),
        ({"balance": {"iterations": "forever"}}, "balance.iterations", "'forever'"),
        ({"balance": {"target": {"power": -1}}}, "balance.target.power", "-1"),
        ({"balance": {"target": "flat"}}, "balance.target", "'flat'"),
        ({"balance": {"marginals": ["image_cluster", "colour"]}}, "balance.marginals", "colour"),
        ({"balance": {"targets": {"label": "uniform"}}}, "balance.targets.label", "label"),
        ({"embed": {"batch_size": 0}}, "embed.batch_size", "0"),
        ({"embed": {"device": "tpu"}}, "embed.device", "'tpu'"),
        ({"cluster": {"spherical": "yes"}}, "cluster.spherical", "'yes'"),
        ({"cluster": {"niter": 2.5}}, "cluster.niter", "2.5"),
        ({"ray": {"num_cpus": -2}}, "ray.num_cpus", "-2"),
        ({"ray": {"listen": "0.0.0.0"}}, "ray.listen", "'0.0.0.0'"),
        ({"data": {"carry": "label"}}, "data.carry", "'label'"),
        ({"data": {"path": "/no/such/dir"}}, "data.path", "'/no/such/dir'"),
        ({"balance": {"max_weight": 0.5}}, "balance.max_weight", "0.5"),
        ({"balance": {"overrelaxation": 2.0}}, "balance.overrelaxation", "2.0"),
        ({"balance": {"overrelaxation": "fast"}}, "balance.overrelaxation", "'fast'"),
        ({"balance": {"relax": -1}}, "balance.relax", "-1"),
        ({"balance": {"relax": "soft"}}, "balance.relax", "'soft'"),
        ({"balance": {"relax": {"label": 1.0}}}, "balance.relax.label", "label"),
        ({"balance": {"relax": {"image_cluster": -0.5}}}, "balance.relax.image_cluster", "-0.5"),
    ],
)
def test_bad_values_name_field_and_value(data_dir, patch, field, shown):
    raw = {"data": {"path": data_dir}}
    for section, values in patch.items():
        raw[section] = {**raw.get(section, {}), **values}
    with pytest.raises(SpecError) as info:
        Spec.from_dict(raw)
    message = str(info.value)
    assert f"'{field}'" in message and shown in message, message


def test_yaml_numbers_without_a_dot_are_numbers(data_dir, tmp_path):
    # YAML 1.1 (PyYAML) reads 1e-6 and 5E1 as strings; float fields take them as the numbers they look like.
    path = tmp_path / "spec.yaml"
    path.write_text(
        f"data: {{path: {data_dir}}}\n"
        "balance: {tol: 1e-6, max_weight: 5E1, target: {power: 5e-1}, overrelaxation: 1.5e0,\n"
        "          soft: {temperature: 2e-2}}\n"
    )
    assert yaml.safe_load(path.read_text())["balance"]["tol"] == "1e-6"  # what the bug was
    spec = Spec.from_yaml(path)
    assert spec.balance.tol == 1e-6 and spec.balance.max_weight == 50.0
    assert spec.balance.target == Target(kind="power", value=0.5)
    assert spec.balance.overrelaxation == 1.5 and spec.balance.soft.temperature == 0.02
    for bad in ("1e-6x", "nan", "tiny", "1e"):
        with pytest.raises(SpecError, match=r"'balance.tol': expected a number") as info:
            Spec.from_dict({"data": {"path": data_dir}, "balance": {"tol": bad}})
        assert repr(bad) in str(info.value)
    with pytest.raises(SpecError, match=r"'cluster.niter': expected an integer"):
        Spec.from_dict({"data": {"path": data_dir}, "cluster": {"niter": "1e1"}})


def test_cluster_nredo_is_auto_or_a_positive_integer(data_dir):
    def nredo(value):
        return Spec.from_dict({"data": {"path": data_dir}, "cluster": {"nredo": value}}).cluster.nredo

    assert Spec.from_dict({"data": {"path": data_dir}}).cluster.nredo == "auto"
    assert nredo("auto") == "auto" and nredo(20) == 20 and nredo(1) == 1
    for bad in (0, -2):
        with pytest.raises(SpecError, match=r"'cluster.nredo': must be an integer >= 1 or 'auto'"):
            nredo(bad)
    for bad in ("many", 2.5, True, "Auto"):
        with pytest.raises(SpecError, match="'cluster.nredo': expected an integer or 'auto'"):
            nredo(bad)


def test_unknown_keys_suggest_the_right_one(data_dir):
    with pytest.raises(SpecError, match=r"'cluster.nitre': unknown field; did you mean 'niter'"):
        Spec.from_dict({"data": {"path": data_dir}, "cluster": {"nitre": 3}})
    with pytest.raises(SpecError, match="'balanse': unknown field"):
        Spec.from_dict({"data": {"path": data_dir}, "balanse": {}})


def test_missing_data_path_and_bad_files(tmp_path):
    with pytest.raises(SpecError, match="'data.path': is required"):
        Spec.from_dict({"data": {}})
    with pytest.raises(SpecError, match="spec file does not exist"):
        Spec.from_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        Spec.from_yaml(bad)
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(SpecError, match="expected a mapping"):
        Spec.from_yaml(tmp_path / "list.yaml")


def test_weights_target_from_file(data_dir, tmp_path):
    weights = tmp_path / "w.yaml"
    weights.write_text("web: 2\nstock: 1\n")
    spec = Spec.from_dict(
        {
            "data": {"path": data_dir, "carry": ["source"]},
            "balance": {"marginals": ["source"], "target": {"weights": str(weights)}},
        }
    )
    assert spec.balance.target.value == {"web": 2.0, "stock": 1.0}
    with pytest.raises(SpecError, match=r"'balance.target.weights': file does not exist"):
        Spec.from_dict({"data": {"path": data_dir}, "balance": {"target": {"weights": str(tmp_path / "x")}}})


def test_relax_per_marginal(data_dir):
    spec = Spec.from_dict({"data": {"path": data_dir}, "balance": {"relax": {"image_cluster": 2}}})
    assert spec.balance.relax_for("image_cluster") == 2.0 and spec.balance.relax_for("text_cluster") is None
    assert Spec.from_dict(spec.to_dict()) == spec
    scalar = Spec.from_dict({"data": {"path": data_dir}, "balance": {"relax": 0.5}})
    assert [scalar.balance.relax_for(m) for m in scalar.balance.marginals] == [0.5, 0.5]
    exact = Spec.from_dict({"data": {"path": data_dir}, "balance": {"relax": "exact"}})
    assert exact.balance.relax_for("image_cluster") is None


def test_relax_auto_relaxes_cluster_marginals_only(data_dir):
    spec = Spec.from_dict({"data": {"path": data_dir, "carry": ["source"]}})
    assert spec.balance.relax == "auto"
    strengths = {m: spec.balance.relax_for(m) for m in ("image_cluster", "text_cluster_2", "joint_cluster")}
    assert strengths == {"image_cluster": 1.0, "text_cluster_2": 1.0, "joint_cluster": 1.0}
    for name in ("source", "dup_group", "concept", "zero_shot", "image_clusters", "my_cluster"):
        assert spec.balance.relax_for(name) is None, name
    assert Spec.from_dict(spec.to_dict()) == spec


def test_a_carried_column_may_not_shadow_a_column_the_run_computes(data_dir):
    from rebalance.data.synthetic import PROMPTS_FILE, VOCABULARY_FILE

    concepts = {"vocabulary": str(VOCABULARY_FILE), "field": "caption", "prompts": str(PROMPTS_FILE)}
    for carry, extra in (
        (["caption", "concept"], {"concepts": concepts}),
        (["caption", "zero_shot"], {"concepts": concepts}),
        (["image_cluster"], {}),
        (["dup_group"], {"dedup": {"threshold": 0.99}}),
    ):
        with pytest.raises(SpecError, match="'data.carry': names a column the run computes itself") as info:
            Spec.from_dict({"data": {"path": data_dir, "carry": carry}, **extra})
        assert repr(carry[-1]) in str(info.value)
    # without the section that computes it, the name is the user's own column
    Spec.from_dict({"data": {"path": data_dir, "carry": ["concept", "dup_group"]}})
