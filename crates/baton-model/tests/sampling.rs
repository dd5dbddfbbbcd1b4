//! Sampling: the documented semantics, determinism, resumption, validation and cost.

use baton_model::sampling::{Sampled, Sampler, SamplingParams, MAX_TOP_LOGPROBS};
use baton_model::ModelError;
use candle_core::{DType, Device, Tensor};
use proptest::prelude::*;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Runs `f` on its own thread and fails the test if it takes longer than `secs`.
fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("test took longer than {secs} s"),
        Err(mpsc::RecvTimeoutError::Disconnected) => match handle.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => unreachable!("the closure returned without sending"),
        },
    }
}

fn row(values: &[f32]) -> Tensor {
    Tensor::new(values, &Device::Cpu).unwrap()
}

/// Logits whose softmax is exactly `probs`.
fn from_probs(probs: &[f32]) -> Tensor {
    row(&probs.iter().map(|p| p.ln()).collect::<Vec<_>>())
}

/// A pseudo-random row of logits, a pure function of `(seed, len)`.
fn noise(seed: u64, len: usize, scale: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
        })
        .collect()
}

fn log_softmax(values: &[f32]) -> Vec<f32> {
    candle_nn::ops::log_softmax(&row(values), 0)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
    let mut p = SamplingParams::default();
    f(&mut p);
    p
}

/// How often each token is drawn over `n` steps from the same logits.
fn frequencies(p: SamplingParams, logits: &Tensor, n: usize) -> Vec<f64> {
    let vocab = logits.dims()[0];
    let mut s = Sampler::new(p, &[]).unwrap();
    let mut counts = vec![0usize; vocab];
    for _ in 0..n {
        counts[s.sample(logits).unwrap().token as usize] += 1;
    }
    counts.iter().map(|&c| c as f64 / n as f64).collect()
}

#[test]
fn default_is_greedy_and_valid() {
    let p = SamplingParams::default();
    assert!(p.is_greedy());
    assert_eq!(p, SamplingParams::greedy());
    p.validate().unwrap();
    assert_eq!(p.repetition_penalty, 1.0);
    assert_eq!(p.top_logprobs, 0);
}

#[test]
fn validate_names_the_bad_field() {
    let cases: Vec<(&str, SamplingParams)> = vec![
        ("temperature", params(|p| p.temperature = -0.1)),
        ("temperature", params(|p| p.temperature = f32::NAN)),
        ("temperature", params(|p| p.temperature = f32::INFINITY)),
        ("top_k", params(|p| p.top_k = Some(0))),
        ("top_p", params(|p| p.top_p = Some(0.0))),
        ("top_p", params(|p| p.top_p = Some(1.5))),
        ("top_p", params(|p| p.top_p = Some(f32::NAN))),
        ("min_p", params(|p| p.min_p = Some(-0.1))),
        ("min_p", params(|p| p.min_p = Some(1.1))),
        ("repetition_penalty", params(|p| p.repetition_penalty = 0.0)),
        (
            "repetition_penalty",
            params(|p| p.repetition_penalty = f32::NAN),
        ),
        ("presence_penalty", params(|p| p.presence_penalty = 2.5)),
        ("frequency_penalty", params(|p| p.frequency_penalty = -2.5)),
        (
            "frequency_penalty",
            params(|p| p.frequency_penalty = f32::NAN),
        ),
        (
            "top_logprobs",
            params(|p| p.top_logprobs = MAX_TOP_LOGPROBS + 1),
        ),
    ];
    for (field, p) in cases {
        let bad = p.check().expect_err(field);
        assert_eq!(bad.field, field, "{p:?}");
        match p.validate() {
            Err(ModelError::Sampling(msg)) => assert!(msg.contains(field), "{msg}"),
            other => panic!("{field}: expected a sampling error, got {other:?}"),
        }
        assert!(Sampler::new(p, &[]).is_err(), "{field}");
    }
    let ok = params(|p| {
        p.temperature = 0.7;
        p.top_k = Some(40);
        p.top_p = Some(1.0);
        p.min_p = Some(0.0);
        p.repetition_penalty = 1.1;
        p.presence_penalty = -2.0;
        p.frequency_penalty = 2.0;
        p.top_logprobs = MAX_TOP_LOGPROBS;
    });
    ok.validate().unwrap();
}

#[test]
fn params_deserialise_with_defaults_and_round_trip() {
    let p: SamplingParams = serde_json::from_str(r#"{"temperature": 0.8, "top_p": 0.9}"#).unwrap();
    assert_eq!(p.temperature, 0.8);
    assert_eq!(p.top_p, Some(0.9));
    assert_eq!(p.top_k, None);
    assert_eq!(p.repetition_penalty, 1.0);
    let back: SamplingParams = serde_json::from_str(&serde_json::to_string(&p).unwrap()).unwrap();
    assert_eq!(back, p);
}

#[test]
fn greedy_takes_the_argmax_lowest_id_on_ties_and_reports_raw_logprobs() {
    within(30, || {
        let values = [0.5, 3.0, -1.0, 3.0, 2.0];
        let mut s = Sampler::new(params(|p| p.top_logprobs = 3), &[9, 9]).unwrap();
        let Sampled {
            token,
            logprob,
            top_logprobs,
        } = s.sample(&row(&values)).unwrap();
        assert_eq!(token, 1);
        let reference = log_softmax(&values);
        assert!((logprob - reference[1]).abs() < 1e-5);
        let ids: Vec<u32> = top_logprobs.iter().map(|&(id, _)| id).collect();
        assert_eq!(ids, vec![1, 3, 4]);
        for &(id, lp) in &top_logprobs {
            assert!((lp - reference[id as usize]).abs() < 1e-5, "{id}: {lp}");
        }
        assert_eq!(s.generated(), &[1]);
        // No alternatives asked, none reported; the chosen token's logprob always is.
        let mut s = Sampler::new(SamplingParams::default(), &[]).unwrap();
        let out = s.sample(&row(&values)).unwrap();
        assert!(out.top_logprobs.is_empty());
        assert!((out.logprob - reference[1]).abs() < 1e-5);
    });
}

#[test]
fn accepts_a_leading_unit_dimension_and_half_precision() {
    within(30, || {
        let values = [0.1f32, 0.2, 5.0, 0.3];
        for t in [
            row(&values).reshape((1, 4)).unwrap(),
            row(&values).to_dtype(DType::F16).unwrap(),
            row(&values).to_dtype(DType::BF16).unwrap(),
        ] {
            let mut s = Sampler::new(SamplingParams::default(), &[]).unwrap();
            assert_eq!(s.sample(&t).unwrap().token, 2);
        }
    });
}

#[test]
fn rejects_rows_no_distribution_comes_from() {
    within(30, || {
        let bad = [
            Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap(),
            Tensor::zeros((0,), DType::F32, &Device::Cpu).unwrap(),
            row(&[0.0, f32::NAN, 1.0]),
            row(&[0.0, f32::INFINITY]),
            row(&[f32::NEG_INFINITY; 3]),
        ];
        for t in bad {
            for p in [SamplingParams::default(), params(|p| p.temperature = 1.0)] {
                let mut s = Sampler::new(p, &[]).unwrap();
                match s.sample(&t) {
                    Err(ModelError::Sampling(_)) => {}
                    other => panic!("{t}: expected a sampling error, got {other:?}"),
                }
                assert!(s.generated().is_empty(), "a failed call records nothing");
            }
        }
    });
}

#[test]
fn masked_tokens_are_never_drawn() {
    within(30, || {
        let values = [f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY, 0.0];
        let f = frequencies(params(|p| p.temperature = 1.0), &row(&values), 2000);
        assert_eq!(f[0], 0.0);
        assert_eq!(f[2], 0.0);
        assert!((f[1] - 0.5).abs() < 0.05, "{f:?}");
    });
}

#[test]
fn same_seed_same_tokens_other_seed_other_tokens() {
    within(60, || {
        let run = |seed: u64| {
            let mut s = Sampler::new(
                params(|p| {
                    p.temperature = 1.0;
                    p.seed = seed;
                }),
                &[1, 2, 3],
            )
            .unwrap();
            (0..64)
                .map(|step| s.sample(&row(&noise(step, 1000, 4.0))).unwrap().token)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    });
}

#[test]
fn temperature_sampling_follows_the_tempered_softmax() {
    within(60, || {
        let probs = [0.1f32, 0.2, 0.3, 0.4];
        let n = 20_000;
        let f = frequencies(params(|p| p.temperature = 1.0), &from_probs(&probs), n);
        for (i, (&got, &want)) in f.iter().zip(&probs).enumerate() {
            assert!(
                (got - want as f64).abs() < 0.02,
                "token {i}: {got} vs {want}"
            );
        }
        // T = 0.5 squares the probabilities before renormalising.
        let sq: f64 = probs.iter().map(|&p| (p * p) as f64).sum();
        let f = frequencies(params(|p| p.temperature = 0.5), &from_probs(&probs), n);
        for (i, (&got, &p)) in f.iter().zip(&probs).enumerate() {
            let want = (p * p) as f64 / sq;
            assert!((got - want).abs() < 0.02, "token {i}: {got} vs {want}");
        }
    });
}

#[test]
fn top_k_keeps_the_k_most_probable() {
    within(60, || {
        let probs = [0.05f32, 0.3, 0.1, 0.25, 0.2, 0.1];
        let f = frequencies(
            params(|p| {
                p.temperature = 1.0;
                p.top_k = Some(3);
            }),
            &from_probs(&probs),
            10_000,
        );
        // Kept: 1, 3, 4 (0.3, 0.25, 0.2), renormalised over 0.75.
        for (i, want) in [(1, 0.4), (3, 1.0 / 3.0), (4, 4.0 / 15.0)] {
            assert!((f[i] - want).abs() < 0.03, "token {i}: {} vs {want}", f[i]);
        }
        assert_eq!(f[0] + f[2] + f[5], 0.0);
        // top_k = 1 is greedy whatever the temperature.
        let f = frequencies(
            params(|p| {
                p.temperature = 5.0;
                p.top_k = Some(1);
            }),
            &from_probs(&probs),
            500,
        );
        assert_eq!(f[1], 1.0);
    });
}

#[test]
fn top_p_keeps_the_smallest_prefix_reaching_p() {
    within(60, || {
        let probs = [0.05f32, 0.5, 0.15, 0.3];
        let support = |top_p: f32| {
            let f = frequencies(
                params(|p| {
                    p.temperature = 1.0;
                    p.top_p = Some(top_p);
                }),
                &from_probs(&probs),
                4000,
            );
            (0..4).filter(|&i| f[i] > 0.0).collect::<Vec<_>>()
        };
        assert_eq!(support(0.4), vec![1]);
        assert_eq!(support(0.79), vec![1, 3]);
        assert_eq!(support(0.81), vec![1, 2, 3]);
        assert_eq!(support(0.96), vec![0, 1, 2, 3]);
        assert_eq!(support(1.0), vec![0, 1, 2, 3]);
    });
}

#[test]
fn top_p_after_top_k_sees_the_renormalised_distribution() {
    within(60, || {
        // Top-2 keeps 0.4 and 0.3, renormalised to 4/7 and 3/7: with top_p 0.5 only the first
        // survives (4/7 >= 0.5). Without renormalising, 0.4 < 0.5 would keep both.
        let probs = [0.4f32, 0.3, 0.2, 0.1];
        let f = frequencies(
            params(|p| {
                p.temperature = 1.0;
                p.top_k = Some(2);
                p.top_p = Some(0.5);
            }),
            &from_probs(&probs),
            2000,
        );
        assert_eq!(f[0], 1.0, "{f:?}");
    });
}

#[test]
fn min_p_drops_tokens_below_a_fraction_of_the_best() {
    within(60, || {
        let probs = [0.5f32, 0.3, 0.15, 0.05];
        let support = |min_p: f32, temperature: f32| {
            let f = frequencies(
                params(|p| {
                    p.temperature = temperature;
                    p.min_p = Some(min_p);
                }),
                &from_probs(&probs),
                4000,
            );
            (0..4).filter(|&i| f[i] > 0.0).collect::<Vec<_>>()
        };
        assert_eq!(support(0.35, 1.0), vec![0, 1]);
        assert_eq!(support(0.25, 1.0), vec![0, 1, 2]);
        assert_eq!(support(0.0, 1.0), vec![0, 1, 2, 3]);
        // Min-p sees the tempered distribution: at T = 0.5 the ratios are squared (0.36, 0.09).
        assert_eq!(support(0.35, 0.5), vec![0, 1]);
        assert_eq!(support(0.4, 0.5), vec![0]);
    });
}

#[test]
fn repetition_penalty_is_hf_style_over_prompt_and_generated() {
    within(30, || {
        let values = [2.0f32, -1.0, 1.9, 1.05];
        let p = params(|p| p.repetition_penalty = 2.0);
        // Token 0 is in the prompt: 2.0 / 2 = 1.0 < 1.9, so 2 wins.
        let mut s = Sampler::new(p.clone(), &[0, 1, 0]).unwrap();
        let out = s.sample(&row(&values)).unwrap();
        assert_eq!(out.token, 2);
        // The logprob is the raw model's, not the penalised one.
        assert!((out.logprob - log_softmax(&values)[2]).abs() < 1e-5);
        // Now 2 was generated too: 1.9 / 2 = 0.95 < 1.05, so 3 wins.
        assert_eq!(s.sample(&row(&values)).unwrap().token, 3);
        // A negative logit is multiplied: -1.0 * 2 = -2.0 < -1.5.
        let mut s = Sampler::new(p, &[1]).unwrap();
        assert_eq!(s.sample(&row(&[-1.5, -1.0])).unwrap().token, 0);
        // Out-of-vocabulary ids in the prompt are ignored.
        let mut s = Sampler::new(params(|p| p.repetition_penalty = 2.0), &[1000]).unwrap();
        assert_eq!(s.sample(&row(&values)).unwrap().token, 0);
    });
}

#[test]
fn presence_and_frequency_penalties_are_openai_style_over_generated_only() {
    within(30, || {
        let values = [1.0f32, 0.9, 0.0];
        // The prompt does not count for these penalties.
        let mut s = Sampler::new(params(|p| p.frequency_penalty = 0.2), &[0, 0, 0]).unwrap();
        assert_eq!(s.sample(&row(&values)).unwrap().token, 0);
        // 1.0 - 0.2 * 1 = 0.8 < 0.9.
        assert_eq!(s.sample(&row(&values)).unwrap().token, 1);
        // 0.9 - 0.2 = 0.7 < 0.8.
        assert_eq!(s.sample(&row(&values)).unwrap().token, 0);
        // Token 0 now counts 2: 1.0 - 0.4 = 0.6 < 0.7 (token 1 counts 1).
        assert_eq!(s.sample(&row(&values)).unwrap().token, 1);

        // Presence is a flat amount once a token appeared, however often.
        let mut s = Sampler::new(params(|p| p.presence_penalty = 0.5), &[]).unwrap();
        let tokens: Vec<u32> = (0..4)
            .map(|_| s.sample(&row(&values)).unwrap().token)
            .collect();
        // 0 then 1 (1.0 - 0.5 < 0.9) then 0 (0.5 vs 0.4) and 0 again (the penalty does not grow).
        assert_eq!(tokens, vec![0, 1, 0, 0]);
    });
}

#[test]
fn resumed_sampler_draws_what_the_undisturbed_one_draws() {
    within(120, || {
        let p = params(|p| {
            p.temperature = 0.9;
            p.top_k = Some(50);
            p.top_p = Some(0.95);
            p.repetition_penalty = 1.3;
            p.frequency_penalty = 0.4;
            p.presence_penalty = 0.3;
            p.seed = 1234;
        });
        let prompt = [5u32, 6, 7, 5];
        let logits: Vec<Tensor> = (0..40).map(|i| row(&noise(i, 300, 6.0))).collect();
        let mut s = Sampler::new(p.clone(), &prompt).unwrap();
        let full: Vec<u32> = logits.iter().map(|l| s.sample(l).unwrap().token).collect();
        for k in 0..full.len() {
            let mut r = Sampler::resume(p.clone(), &prompt, &full[..k]).unwrap();
            assert_eq!(r.generated(), &full[..k]);
            let rest: Vec<u32> = logits[k..]
                .iter()
                .map(|l| r.sample(l).unwrap().token)
                .collect();
            assert_eq!(rest, full[k..], "resumed after {k} tokens");
        }
    });
}

/// For any valid parameters, resuming gives the undisturbed continuation, and with no penalty
/// every draw lies within the top-k of the raw row.
#[test]
fn resume_and_support_hold_for_any_params() {
    within(120, || {
        let strategy = (
            prop_oneof![Just(0.0f32), 0.05f32..3.0],
            proptest::option::of(1usize..80),
            proptest::option::of(0.05f32..1.0),
            proptest::option::of(0.0f32..0.9),
            prop_oneof![Just(1.0f32), 0.5f32..2.0],
            prop_oneof![Just(0.0f32), -2.0f32..2.0],
            prop_oneof![Just(0.0f32), -2.0f32..2.0],
            any::<u64>(),
            0usize..12,
        );
        let config = ProptestConfig {
            cases: 64,
            failure_persistence: None,
            ..ProptestConfig::default()
        };
        let mut runner = proptest::test_runner::TestRunner::new(config);
        let result = runner.run(&strategy, |(t, k, tp, mp, rep, pres, freq, seed, split)| {
            let p = SamplingParams {
                temperature: t,
                top_k: k,
                top_p: tp,
                min_p: mp,
                repetition_penalty: rep,
                presence_penalty: pres,
                frequency_penalty: freq,
                seed,
                top_logprobs: 2,
            };
            let penalised = rep != 1.0 || pres != 0.0 || freq != 0.0;
            let prompt = [3u32, 1, 4, 1, 5];
            let logits: Vec<Vec<f32>> = (0..12).map(|i| noise(seed ^ i, 64, 8.0)).collect();
            let mut s = Sampler::new(p.clone(), &prompt).unwrap();
            let mut full = Vec::new();
            for l in &logits {
                let out = s.sample(&row(l)).unwrap();
                prop_assert!((out.token as usize) < 64);
                prop_assert_eq!(out.top_logprobs.len(), 2);
                if let (Some(k), false) = (k, penalised) {
                    let better = l.iter().filter(|&&x| x > l[out.token as usize]).count();
                    prop_assert!(better < k, "token ranks {} with top_k {}", better, k);
                }
                full.push(out.token);
            }
            let mut r = Sampler::resume(p, &prompt, &full[..split]).unwrap();
            let rest: Vec<u32> = logits[split..]
                .iter()
                .map(|l| r.sample(&row(l)).unwrap().token)
                .collect();
            prop_assert_eq!(&rest[..], &full[split..]);
            Ok(())
        });
        if let Err(e) = result {
            panic!("{e}");
        }
    });
}

#[test]
fn a_large_vocabulary_row_samples_quickly() {
    within(120, || {
        let vocab = 151_936;
        let logits = row(&noise(7, vocab, 20.0));
        let cases = [
            ("greedy", SamplingParams::default()),
            ("temperature", params(|p| p.temperature = 0.8)),
            (
                "top_k+top_p+min_p",
                params(|p| {
                    p.temperature = 0.8;
                    p.top_k = Some(40);
                    p.top_p = Some(0.9);
                    p.min_p = Some(0.05);
                }),
            ),
            (
                "top_p",
                params(|p| {
                    p.temperature = 0.8;
                    p.top_p = Some(0.95);
                }),
            ),
            (
                "penalties+logprobs",
                params(|p| {
                    p.temperature = 0.8;
                    p.repetition_penalty = 1.1;
                    p.frequency_penalty = 0.5;
                    p.top_logprobs = 20;
                }),
            ),
        ];
        let prompt: Vec<u32> = (0..2000).map(|i| (i * 71) % vocab as u32).collect();
        for (name, p) in cases {
            let mut s = Sampler::new(p, &prompt).unwrap();
            let n = 20;
            let start = Instant::now();
            for _ in 0..n {
                s.sample(&logits).unwrap();
            }
            let per_call = start.elapsed() / n;
            eprintln!("{name}: {per_call:?} per call over {vocab} logits");
            // Generous for unoptimised CI builds; an O(vocab log vocab) or per-call quadratic
            // path would still stand out against the decode step it runs after.
            assert!(per_call < Duration::from_millis(60), "{name}: {per_call:?}");
        }
    });
}
