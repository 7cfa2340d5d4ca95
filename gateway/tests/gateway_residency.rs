//! Merges held as deltas over one resident base, on a real server: a
//! lowrank merge at full energy answers what its dense merge answers, a
//! sparse one is far smaller, both share the base (one cache entry, weighed
//! once) and are batched with it in one scheduler; `GET /v1/merges/{id}`
//! reports the form, bytes and measured error; combinations hold only
//! their coefficients over task vectors resident once; bad forms are clear
//! 400s.

mod gateway_util;

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use gateway_util::*;
use runtime::model::random::random_weights;
use serde_json::{json, Value};

/// A pool whose experts are the base plus a rank-2 delta on every matrix
/// (as fine-tunes are nearly low-rank), with a small shift on every norm.
fn low_rank_pool() -> Pool {
    let dir = tempfile::tempdir().unwrap();
    let cfg = model_config(32, 64, 2);
    let base = random_weights(&cfg, 1, 0.4).unwrap();
    write_model(&dir.path().join("base"), &cfg, &base);
    for (e, name) in EXPERTS.iter().enumerate() {
        let mut w: HashMap<String, Tensor> = HashMap::new();
        for (t, (k, v)) in base.iter().enumerate() {
            let wave =
                |i: usize, c: usize| ((i * 7 + c * 13 + t * 3 + e * 5) % 11) as f32 / 11.0 - 0.5;
            let d: Vec<f32> = match *v.dims() {
                [out, inp] => (0..out * inp)
                    .map(|x| {
                        let (i, j) = (x / inp, x % inp);
                        0.3 * (wave(i, 0) * wave(j, 1) + wave(i, 2) * wave(j, 3))
                    })
                    .collect(),
                [n] => (0..n).map(|i| 0.05 * wave(i, 4)).collect(),
                _ => unreachable!(),
            };
            let d = Tensor::from_vec(d, v.dims(), &Device::Cpu).unwrap();
            w.insert(k.clone(), (v + d).unwrap());
        }
        write_model(&dir.path().join(name), &cfg, &w);
    }
    Pool { dir }
}

fn model_bytes() -> u64 {
    (model_config(32, 64, 2).num_parameters() * 4) as u64
}

async fn merge_info(c: &Client, reply: &Reply) -> Value {
    assert_eq!(reply.status, 200, "{}", reply.text);
    let id = reply.json()["model"].as_str().unwrap().to_string();
    let r = c.get(&format!("/v1/merges/{id}")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delta_merges_share_the_base_and_answer_as_their_dense_merge() {
    let pool = low_rank_pool();
    let server = start(pool.config(""));
    let c = Client::new(&server);
    let prompt = "What is 2+3?";
    let dense = c.chat("task_arithmetic(math,code)", prompt, 12).await;
    assert_eq!(dense.status, 200, "{}", dense.text);

    // Two rank-2 task vectors: their sum has rank at most 4 per matrix.
    let low = c
        .chat(
            "task_arithmetic(math,code;form=lowrank,form_energy=1)",
            prompt,
            12,
        )
        .await;
    assert_eq!(content(&low.json()), content(&dense.json()), "{}", low.text);
    let info = merge_info(&c, &low).await;
    let r = &info["residency"];
    assert_eq!(r["form"], "lowrank", "{info}");
    assert!(r["rank"]["max"].as_u64().unwrap() <= 4, "{info}");
    assert!(r["max_error"].as_f64().unwrap() < 1e-5, "{info}");
    let low_bytes = info["bytes"].as_u64().unwrap();
    assert_eq!(Some(low_bytes), r["bytes"].as_u64());
    assert_eq!(r["dense_bytes"].as_u64(), Some(model_bytes()));
    assert!(low_bytes * 4 < model_bytes(), "{info}");

    // A sparse delta keeps a tenth of the entries, with a measured error.
    let sparse = c
        .chat(
            "task_arithmetic(math,code;form=sparse,form_density=0.1)",
            prompt,
            12,
        )
        .await;
    let info = merge_info(&c, &sparse).await;
    let r = &info["residency"];
    assert_eq!(
        (r["form"].as_str(), r["density"].as_f64()),
        (Some("sparse"), Some(0.1))
    );
    let (max, mean) = (
        r["max_error"].as_f64().unwrap(),
        r["mean_error"].as_f64().unwrap(),
    );
    assert!(0.0 < mean && mean <= max && max < 1.0, "{info}");
    let sparse_bytes = info["bytes"].as_u64().unwrap();
    assert!(sparse_bytes * 2 < model_bytes(), "{info}");

    // The cache holds the dense merge, the base once, and the two deltas.
    let listed = c.get("/v1/models").await.json();
    let names: Vec<&str> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert!(names.contains(&"demo/base"), "{listed}");
    assert_eq!(c.metric("fusion_merge_cache_entries").await, 4.0);
    assert_eq!(
        c.metric("fusion_merge_cache_bytes").await as u64,
        2 * model_bytes() + low_bytes + sparse_bytes
    );

    // The base and both deltas at once, in one batch: each answers what it
    // answers alone.
    let alone_base = c.chat("demo/base", prompt, 12).await;
    let models = [
        "demo/base",
        "task_arithmetic(math,code;form=lowrank,form_energy=1)",
        "task_arithmetic(math,code;form=sparse,form_density=0.1)",
    ];
    let tasks: Vec<_> = models
        .iter()
        .flat_map(|m| [m, m])
        .map(|m| {
            let c = c.clone();
            let m = m.to_string();
            tokio::spawn(async move { c.chat(&m, prompt, 12).await })
        })
        .collect();
    let mut replies = Vec::new();
    for t in tasks {
        replies.push(t.await.unwrap());
    }
    let want = [&alone_base, &low, &sparse];
    for (i, r) in replies.iter().enumerate() {
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(
            content(&r.json()),
            content(&want[i / 2].json()),
            "request {i}"
        );
    }
    // One scheduler (the base's) ran them all: steps held several
    // sequences (every request before was alone in its steps).
    let steps = c.metric("fusion_batch_sequences_count").await;
    let single = c.metric(r#"fusion_batch_sequences_bucket{le="1"}"#).await;
    assert!(
        steps > single,
        "no step batched two sequences ({steps} steps)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_forms_are_clear_400s_and_the_server_keeps_serving() {
    let pool = Pool::small();
    let server = start(pool.config(""));
    let c = Client::new(&server);
    for (model, needle) in [
        ("task_arithmetic(math,code;form=svd)", "unknown form `svd`"),
        (
            "task_arithmetic(math,code;form=sparse,form_density=2)",
            "residency.density",
        ),
        (
            "task_arithmetic(math,code;form=sparse,form_energy=0.9)",
            "belongs to form `lowrank`",
        ),
        ("we_moe(math,code;form=lowrank)", "held dense"),
    ] {
        let r = c.chat(model, "hi", 4).await;
        let e = r.assert_error(400, "invalid_request_error");
        assert!(
            e["message"].as_str().unwrap().contains(needle),
            "{model}: {e}"
        );
    }
    let over = c
        .chat(
            "task_arithmetic(math,code;form=lowrank,form_rank=100000)",
            "hi",
            4,
        )
        .await;
    assert!(over.status == 400 || over.status == 413, "{}", over.text);
    assert!(over.text.contains("residency.rank"), "{}", over.text);
    let ok = c
        .chat("task_arithmetic(math,code;form=sparse)", "hi", 4)
        .await;
    assert_eq!(ok.status, 200, "{}", ok.text);
    let structured = c
        .post(
            "/v1/chat/completions",
            &json!({"merge": {"method": "task_arithmetic", "models": [{"name": "math"}, {"name": "code"}],
                     "residency": {"form": "lowrank", "rank": 2}},
                    "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}),
        )
        .await;
    assert_eq!(structured.status, 200, "{}", structured.text);
    let info = merge_info(&c, &structured).await;
    assert_eq!(info["residency"]["rank"]["max"], 2, "{info}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn combinations_cost_their_coefficients_over_shared_task_vectors() {
    let pool = low_rank_pool();
    let server = start(pool.config(""));
    let c = Client::new(&server);
    let prompt = "What is 2+3?";
    let merge = |lambda: f64, form: &str| {
        format!("task_arithmetic(math,code;scaling_coefficient={lambda}{form})")
    };
    let dense_vectors = ",form=combination,form_vectors=dense";
    let dense = c.chat(&merge(0.5, ""), prompt, 12).await;
    assert_eq!(dense.status, 200, "{}", dense.text);
    let before = c.metric("fusion_merge_cache_bytes").await as u64;
    assert_eq!(before, model_bytes());

    // Dense task vectors: the combination is the merge, exactly.
    let comb = c.chat(&merge(0.5, dense_vectors), prompt, 12).await;
    assert_eq!(
        content(&comb.json()),
        content(&dense.json()),
        "{}",
        comb.text
    );
    let info = merge_info(&c, &comb).await;
    let r = &info["residency"];
    assert_eq!(r["form"], "combination", "{info}");
    // Two coefficients of 8 bytes are all the merge holds itself.
    assert_eq!(
        (info["bytes"].as_u64(), r["bytes"].as_u64()),
        (Some(16), Some(16))
    );
    assert_eq!(
        r["shared_bytes"].as_u64(),
        Some(2 * model_bytes()),
        "{info}"
    );
    // Dense task vectors differ from the merge by f32 rounding only.
    assert!(r["max_error"].as_f64().unwrap() < 1e-6, "{info}");
    // The dense merge, the base, two task vectors and the coefficients.
    assert_eq!(c.metric("fusion_merge_cache_entries").await, 5.0);
    assert_eq!(
        c.metric("fusion_merge_cache_bytes").await as u64,
        before + 3 * model_bytes() + 16
    );

    // A new λ costs 16 bytes and no compression: it reads the same vectors.
    let dense_08 = c.chat(&merge(0.8, ""), prompt, 12).await;
    let at = c.metric("fusion_merge_cache_bytes").await as u64;
    let comb_08 = c.chat(&merge(0.8, dense_vectors), prompt, 12).await;
    assert_eq!(
        content(&comb_08.json()),
        content(&dense_08.json()),
        "{}",
        comb_08.text
    );
    assert_eq!(c.metric("fusion_merge_cache_bytes").await as u64, at + 16);

    // Both combinations in one batch: each answers what it answers alone
    // (the shared task vectors' products are taken once per step).
    let tasks: Vec<_> = [0.5, 0.8, 0.5, 0.8]
        .into_iter()
        .map(|l| {
            let (c, m) = (c.clone(), merge(l, dense_vectors));
            tokio::spawn(async move { c.chat(&m, prompt, 12).await })
        })
        .collect();
    for (i, t) in tasks.into_iter().enumerate() {
        let r = t.await.unwrap();
        let want = if i % 2 == 0 { &comb } else { &comb_08 };
        assert_eq!(
            content(&r.json()),
            content(&want.json()),
            "request {i}: {}",
            r.text
        );
    }

    // Rank-2 task vectors hold these experts exactly, at a fraction of the
    // bytes.
    let low = c
        .chat(&merge(0.5, ",form=combination,form_rank=2"), prompt, 12)
        .await;
    assert_eq!(content(&low.json()), content(&dense.json()), "{}", low.text);
    let info = merge_info(&c, &low).await;
    let r = &info["residency"];
    assert_eq!(r["rank"]["max"], 2, "{info}");
    assert!(r["max_error"].as_f64().unwrap() < 1e-5, "{info}");
    assert!(
        r["shared_bytes"].as_u64().unwrap() * 4 < 2 * model_bytes(),
        "{info}"
    );

    // Only affine merges with constant coefficients are combinations.
    let ties = c
        .chat("ties_merging(math,code;form=combination)", prompt, 4)
        .await;
    let e = ties.assert_error(400, "invalid_request_error");
    assert!(
        e["message"]
            .as_str()
            .unwrap()
            .contains("form `combination`"),
        "{e}"
    );
    let ok = c.chat(&merge(0.5, dense_vectors), prompt, 4).await;
    assert_eq!(ok.status, 200, "{}", ok.text);
}

/// The residency report of a merge by its id.
async fn residency_of(c: &Client, id: &str) -> Value {
    let r = c.get(&format!("/v1/merges/{id}")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn task_views_cost_their_mask_bits_over_one_unified_vector() {
    let pool = low_rank_pool();
    let server = start(pool.config(""));
    let c = Client::new(&server);
    let prompt = "What is 2+3?";
    for method in ["emr_merging", "tall_masks"] {
        let view = |task: &str, form: &str| format!("{method}(math,code,chat;task={task}{form})");
        // The view held dense: its own full weights.
        let dense = c.chat(&view("math", ",form=dense"), prompt, 12).await;
        assert_eq!(dense.status, 200, "{}", dense.text);
        let before = c.metric("fusion_merge_cache_bytes").await as u64;
        // Served by default as its mask over the merge's unified vector,
        // answering what the dense view answers.
        let math = c.chat(&view("math", ""), prompt, 12).await;
        assert_eq!(
            content(&math.json()),
            content(&dense.json()),
            "{}",
            math.text
        );
        let info = merge_info(&c, &math).await;
        let r = &info["residency"];
        assert_eq!(r["form"], "masked", "{info}");
        let bits = r["bytes"].as_u64().unwrap();
        let unified = r["shared_bytes"].as_u64().unwrap();
        // One bit per parameter (in 64-bit words) and a scale per tensor,
        // against U's 4 bytes per parameter.
        assert!(bits * 16 < model_bytes(), "{info}");
        assert!(
            unified <= model_bytes() && unified * 2 > model_bytes(),
            "{info}"
        );
        assert_eq!(info["bytes"].as_u64(), Some(bits), "{info}");
        let after_math = c.metric("fusion_merge_cache_bytes").await as u64;
        let base = if method == "emr_merging" {
            model_bytes()
        } else {
            0
        };
        assert_eq!(after_math, before + base + unified + bits, "{method}");

        // Another task's view reads the same U: it costs its bits alone.
        let code = c.chat(&view("code", ""), prompt, 12).await;
        assert_eq!(code.status, 200, "{}", code.text);
        let code_info = merge_info(&c, &code).await;
        let code_bits = code_info["residency"]["bytes"].as_u64().unwrap();
        assert_eq!(
            c.metric("fusion_merge_cache_bytes").await as u64,
            after_math + code_bits,
            "{code_info}"
        );
        let dense_code = c.chat(&view("code", ",form=dense"), prompt, 12).await;
        assert_eq!(content(&code.json()), content(&dense_code.json()));

        // The structured spelling names the task as `merge.task`.
        let structured = c
            .post(
                "/v1/chat/completions",
                &json!({
                    "merge": {"method": method, "models": [{"name": "math"}, {"name": "code"},
                              {"name": "chat"}], "task": "code"},
                    "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": 12, "temperature": 0
                }),
            )
            .await;
        assert_eq!(structured.status, 200, "{}", structured.text);
        assert_eq!(content(&structured.json()), content(&code.json()));
        let id = structured.json()["model"].as_str().unwrap().to_string();
        assert_eq!(
            residency_of(&c, &id).await["id"],
            code_info["id"],
            "one merge id"
        );
    }
    // Bad tasks are clear 400s and the server keeps serving.
    for (model, want) in [
        ("emr_merging(math,code)", "task=NAME"),
        (
            "emr_merging(math,code;task=chat)",
            "`chat` is not one of the merge's models",
        ),
        ("task_arithmetic(math,code;form=masked)", "form `masked`"),
    ] {
        let r = c.chat(model, prompt, 4).await;
        let e = r.assert_error(400, "invalid_request_error");
        assert!(
            e["message"].as_str().unwrap().contains(want),
            "{model}: {e}"
        );
    }
    let ok = c
        .chat("emr_merging(math,code,chat;task=chat)", prompt, 4)
        .await;
    assert_eq!(ok.status, 200, "{}", ok.text);
}
