"""medray's storage and models used from real Ray workers and Ray Data."""

from __future__ import annotations

import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq

import ray.cloudpickle

from medray import storage

# Workers cannot import this test module; ship its functions by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _worker_answers(model_uri: str, text: str) -> tuple[str, str]:

    from medray.infer import GenerationEngine, GenerationSettings, Request
    from medray.models import load_model

    lm = load_model(model_uri)
    req = Request([{"role": "user", "content": [{"type": "text", "text": text}]}])
    return os.environ["AWS_ENDPOINT_URL"], GenerationEngine(lm).generate([req], GenerationSettings(max_new_tokens=5))[0].text


def test_workers_load_models_from_s3(ray_cluster, bucket, tiny_dirs, s3_server):
    uri = f"{bucket}/models/medalpaca-tiny"
    storage.upload_dir(tiny_dirs["llama"], uri)
    task = ray_cluster.remote(num_cpus=0.5)(_worker_answers)
    results = ray_cluster.get([task.remote(uri, "Is there an opacity?") for _ in range(2)])
    assert {endpoint for endpoint, _ in results} == {s3_server.endpoint_url}
    local = _worker_answers(uri, "Is there an opacity?")[1]
    assert [text for _, text in results] == [local, local]  # same weights, greedy


def test_ray_data_reads_and_writes_s3_through_storage(ray_cluster, bucket):
    import ray.data

    store = storage.default_storage()
    for i in range(3):
        fs, path = store.filesystem_for(f"{bucket}/in/part-{i}.parquet")
        pq.write_table(pa.table({"id": [f"{i}-{j}" for j in range(10)], "x": list(range(10))}), path, filesystem=fs)

    fs, path = store.filesystem_for(f"{bucket}/in")
    ds = ray.data.read_parquet(path, filesystem=fs).map_batches(
        lambda b: {"id": b["id"], "y": b["x"] * 2}, batch_format="numpy")
    out_fs, out_path = store.filesystem_for(f"{bucket}/out")
    ds.write_parquet(out_path, filesystem=out_fs)

    written = storage.list_files(f"{bucket}/out")
    assert written and all(f.uri.endswith(".parquet") for f in written)
    rows = pa.concat_tables(pq.read_table(out_fs.open_input_file(f.uri[len("s3://"):]))
                            for f in written).to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(f"{i}-{j}" for i in range(3) for j in range(10))
    assert all(r["y"] == 2 * int(r["id"].split("-")[1]) for r in rows)
