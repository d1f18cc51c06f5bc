//! The Llama family forward pass (Llama 2/3.x, SmolLM2; Qwen3 adds per-head q/k norms), written
//! once over the `Backend` op set.

use crate::config::ModelConfig;
use crate::weights::TensorSource;
use crate::Result;
use marlin_kernels::{Backend, DenseFormat, KvLayout, MatmulRows, StepBatch};
use std::sync::atomic::{AtomicU64, Ordering};

/// A number never handed out before in this process: names a model's weights, a workspace or a
/// KV cache in the key under which a backend may record a step's work (`Backend::queue_step`).
fn fresh_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Sees the input of each linear layer as the model runs: what data-aware quantizers (GPTQ)
/// accumulate their Hessians from. `weights` names the projections that share the input
/// (e.g. q, k and v), by their Hugging Face names.
pub trait MatmulObserver {
    /// Layers at and below this one are observed; the step stops after it.
    fn last_layer(&self) -> usize;
    fn observe(
        &mut self,
        layer: usize,
        weights: &[String],
        input: &[f32],
        rows: usize,
        cols: usize,
    );
}

struct Layer<B: Backend> {
    attn_norm: B::Buffer,
    q: B::Weight,
    k: B::Weight,
    v: B::Weight,
    o: B::Weight,
    qk_norms: Option<(B::Buffer, B::Buffer)>,
    mlp_norm: B::Buffer,
    gate: B::Weight,
    up: B::Weight,
    down: B::Weight,
}

pub struct Model<B: Backend> {
    pub config: ModelConfig,
    backend: B,
    embed: B::Weight,
    layers: Vec<Layer<B>>,
    final_norm: B::Buffer,
    /// None when the output projection is tied to the embedding.
    lm_head: Option<B::Weight>,
    rope_table: B::Buffer,
    /// Changes with every weight replaced (`set_weight`).
    id: u64,
}

/// Activation buffers for steps of up to `capacity` tokens, allocated once and reused.
pub struct Workspace<B: Backend> {
    id: u64,
    capacity: usize,
    x: B::Buffer,
    normed: B::Buffer,
    q: B::Buffer,
    k: B::Buffer,
    v: B::Buffer,
    /// Projection output before the q/k norms (Qwen3).
    unnormed: B::Buffer,
    attn: B::Buffer,
    proj: B::Buffer,
    gate: B::Buffer,
    up: B::Buffer,
    act: B::Buffer,
    selected: B::Buffer,
    logits: B::Buffer,
}

/// Every layer's paged KV pool, all with one layout.
pub struct KvCache<B: Backend> {
    pub layout: KvLayout,
    id: u64,
    layers: Vec<B::KvCache>,
}

impl<B: Backend> Model<B> {
    pub fn load(
        backend: B,
        config: ModelConfig,
        source: &dyn TensorSource,
        dtype: DenseFormat,
    ) -> Result<Self> {
        let c = &config;
        let (hidden, q_dim, kv_dim) = (
            c.hidden_size,
            c.num_heads * c.head_dim,
            c.num_kv_heads * c.head_dim,
        );
        let matrix = |name: &str, rows: usize, cols: usize| -> Result<B::Weight> {
            let host = match source.packed(name, rows, cols)? {
                Some(packed) => marlin_quant::HostWeight::quant(packed).map_err(|e| {
                    crate::ModelError::format(source.location(), format!("tensor `{name}`: {e}"))
                })?,
                None => source.require(name)?.to_host_weight(rows, cols, dtype)?,
            };
            Ok(backend.upload_weight(&host)?)
        };
        let vector = |name: &str, len: usize| -> Result<B::Buffer> {
            let values = source.require(name)?.to_vector(len)?;
            let mut buffer = backend.alloc(len)?;
            backend.write(&mut buffer, &values)?;
            Ok(buffer)
        };
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            let qk_norms = if c.qk_norm {
                Some((
                    vector(&format!("{p}.self_attn.q_norm.weight"), c.head_dim)?,
                    vector(&format!("{p}.self_attn.k_norm.weight"), c.head_dim)?,
                ))
            } else {
                None
            };
            layers.push(Layer {
                attn_norm: vector(&format!("{p}.input_layernorm.weight"), hidden)?,
                q: matrix(&format!("{p}.self_attn.q_proj.weight"), q_dim, hidden)?,
                k: matrix(&format!("{p}.self_attn.k_proj.weight"), kv_dim, hidden)?,
                v: matrix(&format!("{p}.self_attn.v_proj.weight"), kv_dim, hidden)?,
                o: matrix(&format!("{p}.self_attn.o_proj.weight"), hidden, q_dim)?,
                qk_norms,
                mlp_norm: vector(&format!("{p}.post_attention_layernorm.weight"), hidden)?,
                gate: matrix(
                    &format!("{p}.mlp.gate_proj.weight"),
                    c.intermediate_size,
                    hidden,
                )?,
                up: matrix(
                    &format!("{p}.mlp.up_proj.weight"),
                    c.intermediate_size,
                    hidden,
                )?,
                down: matrix(
                    &format!("{p}.mlp.down_proj.weight"),
                    hidden,
                    c.intermediate_size,
                )?,
            });
        }
        let embed = matrix("model.embed_tokens.weight", c.vocab_size, hidden)?;
        let lm_head = if c.tie_embeddings {
            None
        } else {
            Some(matrix("lm_head.weight", c.vocab_size, hidden)?)
        };
        let final_norm = vector("model.norm.weight", hidden)?;
        let table = c.rope_table(c.max_context);
        let mut rope_table = backend.alloc(table.len())?;
        backend.write(&mut rope_table, &table)?;
        Ok(Self {
            config,
            backend,
            embed,
            layers,
            final_norm,
            lm_head,
            rope_table,
            id: fresh_id(),
        })
    }

    /// Replaces one projection's weights (by Hugging Face name), e.g. with its quantized form
    /// while a data-aware quantizer works through the layers.
    pub fn set_weight(&mut self, name: &str, weight: &marlin_quant::HostWeight) -> Result<()> {
        let slot = name
            .strip_prefix("model.layers.")
            .and_then(|rest| rest.split_once('.'))
            .and_then(|(i, proj)| {
                let layer = self.layers.get_mut(i.parse::<usize>().ok()?)?;
                Some(match proj {
                    "self_attn.q_proj.weight" => &mut layer.q,
                    "self_attn.k_proj.weight" => &mut layer.k,
                    "self_attn.v_proj.weight" => &mut layer.v,
                    "self_attn.o_proj.weight" => &mut layer.o,
                    "mlp.gate_proj.weight" => &mut layer.gate,
                    "mlp.up_proj.weight" => &mut layer.up,
                    "mlp.down_proj.weight" => &mut layer.down,
                    _ => return None,
                })
            });
        let Some(slot) = slot else {
            return Err(marlin_kernels::KernelError::Shape(format!(
                "no projection named `{name}`"
            ))
            .into());
        };
        let shape = self.backend.weight_shape(slot);
        if shape != (weight.rows, weight.cols) {
            return Err(marlin_kernels::KernelError::Shape(format!(
                "`{name}` is {}x{}, the replacement {}x{}",
                shape.0, shape.1, weight.rows, weight.cols
            ))
            .into());
        }
        *slot = self.backend.upload_weight(weight)?;
        self.id = fresh_id();
        Ok(())
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn workspace(&self, capacity: usize) -> Result<Workspace<B>> {
        let c = &self.config;
        let b = &self.backend;
        let q_dim = c.num_heads * c.head_dim;
        let kv_dim = c.num_kv_heads * c.head_dim;
        Ok(Workspace {
            id: fresh_id(),
            capacity,
            x: b.alloc(capacity * c.hidden_size)?,
            normed: b.alloc(capacity * c.hidden_size)?,
            q: b.alloc(capacity * q_dim)?,
            k: b.alloc(capacity * kv_dim)?,
            v: b.alloc(capacity * kv_dim)?,
            unnormed: b.alloc(capacity * q_dim)?,
            attn: b.alloc(capacity * q_dim)?,
            proj: b.alloc(capacity * c.hidden_size)?,
            gate: b.alloc(capacity * c.intermediate_size)?,
            up: b.alloc(capacity * c.intermediate_size)?,
            act: b.alloc(capacity * c.intermediate_size)?,
            selected: b.alloc(capacity * c.hidden_size)?,
            logits: b.alloc(capacity * c.vocab_size)?,
        })
    }

    pub fn kv_cache(&self, num_blocks: usize, block_size: usize) -> Result<KvCache<B>> {
        let layout = KvLayout {
            num_blocks,
            block_size,
            kv_heads: self.config.num_kv_heads,
            head_dim: self.config.head_dim,
        };
        let layers = (0..self.config.num_layers)
            .map(|_| self.backend.alloc_kv(layout))
            .collect::<std::result::Result<_, _>>()?;
        Ok(KvCache {
            layout,
            id: fresh_id(),
            layers,
        })
    }

    /// Runs one step and returns the logits of `batch.logit_rows`, row after row.
    pub fn forward(
        &self,
        ws: &mut Workspace<B>,
        kv: &mut KvCache<B>,
        batch: &StepBatch,
    ) -> Result<Vec<f32>> {
        self.forward_observed(ws, kv, batch, None)
    }

    /// `forward`, showing each linear layer's input to `observer`; with an observer the step
    /// ends after its last layer and returns no logits.
    pub fn forward_observed(
        &self,
        ws: &mut Workspace<B>,
        kv: &mut KvCache<B>,
        batch: &StepBatch,
        observer: Option<&mut (dyn MatmulObserver + Send)>,
    ) -> Result<Vec<f32>> {
        self.backend.run_step(|| {
            self.forward_inner(ws, kv, batch, observer, |b, logits, rows, vocab| {
                b.read(logits, rows * vocab)
            })
        })
    }

    /// Runs one step and returns the greedy choice (`marlin_kernels::argmax`) of each of
    /// `batch.logit_rows`: only the ids come back from the device, not the logits.
    pub fn forward_greedy(
        &self,
        ws: &mut Workspace<B>,
        kv: &mut KvCache<B>,
        batch: &StepBatch,
    ) -> Result<Vec<u32>> {
        self.queue_greedy(ws, kv, batch)?;
        Ok(self.backend.take_argmax()?)
    }

    /// Queues one step and the greedy choice of each of `batch.logit_rows`, and returns without
    /// waiting for them: the backend's `take_argmax` returns the ids, and the next step may take
    /// them as its tokens on the device (`StepBatch::tokens_from_argmax`).
    pub fn queue_greedy(
        &self,
        ws: &mut Workspace<B>,
        kv: &mut KvCache<B>,
        batch: &StepBatch,
    ) -> Result<()> {
        self.backend.run_step(|| {
            self.forward_inner(ws, kv, batch, None, |b, logits, rows, vocab| {
                b.queue_argmax_rows(logits, rows, vocab)
                    .map(|()| Vec::<()>::new())
            })
        })?;
        Ok(())
    }

    /// The hidden states entering the first decoder layer for `batch`'s tokens (tokens ×
    /// hidden): their embeddings.
    pub fn embed(
        &self,
        ws: &mut Workspace<B>,
        kv: &KvCache<B>,
        batch: &StepBatch,
    ) -> Result<Vec<f32>> {
        let b = &self.backend;
        b.run_step(|| {
            let step = self.prepare(ws, &kv.layout, batch)?;
            b.embedding(&self.embed, &step, &mut ws.x)?;
            Ok(b.read(&ws.x, batch.num_tokens() * self.config.hidden_size)?)
        })
    }

    /// Runs decoder layer `layer` alone: `input` holds `batch`'s hidden states at the layer's
    /// input (tokens × hidden); returns them at its output. The layer writes and attends over its
    /// own KV slots of the batch as in a full step, so running the layers one after another over
    /// a batch computes what `forward` computes. Calibration uses it to keep each window's hidden
    /// state between layers instead of re-running every layer below the one it observes.
    pub fn forward_layer(
        &self,
        ws: &mut Workspace<B>,
        kv: &mut KvCache<B>,
        batch: &StepBatch,
        layer: usize,
        input: &[f32],
        mut observer: Option<&mut (dyn MatmulObserver + Send)>,
    ) -> Result<Vec<f32>> {
        let b = &self.backend;
        let len = batch.num_tokens() * self.config.hidden_size;
        if layer >= self.layers.len() || input.len() != len {
            return Err(marlin_kernels::KernelError::Shape(format!(
                "layer {layer} of {} over {} input values (the batch's hidden states hold {len})",
                self.layers.len(),
                input.len()
            ))
            .into());
        }
        b.run_step(|| {
            let step = self.prepare(ws, &kv.layout, batch)?;
            b.write(&mut ws.x, input)?;
            let prompt = batch.prompt_rows();
            self.layer_step(
                layer,
                ws,
                &mut kv.layers[layer],
                &step,
                MatmulRows {
                    count: batch.num_tokens(),
                    prompt: &prompt,
                },
                &mut observer,
                (false, false),
            )?;
            Ok(b.read(&ws.x, len)?)
        })
    }

    /// Checks a step against the workspace and KV layout and puts it in the backend's form.
    fn prepare(&self, ws: &Workspace<B>, kv: &KvLayout, batch: &StepBatch) -> Result<B::Step> {
        let n = batch.num_tokens();
        batch.validate(kv)?;
        let too_long = batch
            .seqs
            .iter()
            .find(|s| s.context_len > self.config.max_context);
        if n > ws.capacity || too_long.is_some() {
            return Err(marlin_kernels::KernelError::Shape(format!(
                "step of {n} tokens (workspace holds {}) or context beyond the model's {}",
                ws.capacity, self.config.max_context
            ))
            .into());
        }
        // Checked here rather than only by the embedding op, which a replayed step skips.
        let vocab = self.config.vocab_size;
        if let Some(&t) = batch.tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(marlin_kernels::KernelError::Shape(format!(
                "token {t} of a vocabulary of {vocab}"
            ))
            .into());
        }
        Ok(self.backend.prepare_step(batch)?)
    }

    /// The step's ops, then `finish(backend, logits, rows, vocab)` reads its result back (none
    /// with an observer).
    fn forward_inner<T>(
        &self,
        ws: &mut Workspace<B>,
        kv: &mut KvCache<B>,
        batch: &StepBatch,
        mut observer: Option<&mut (dyn MatmulObserver + Send)>,
        finish: impl FnOnce(&B, &B::Buffer, usize, usize) -> marlin_kernels::Result<Vec<T>>,
    ) -> Result<Vec<T>> {
        let c = &self.config;
        let b = &self.backend;
        let n = batch.num_tokens();
        let rows = batch.logit_rows.len();
        let step = self.prepare(ws, &kv.layout, batch)?;
        let prompt = batch.prompt_rows();
        let token_rows = MatmulRows {
            count: n,
            prompt: &prompt,
        };
        let last_layer = observer.as_deref().map(|o| o.last_layer());
        let key = [self.id, ws.id, kv.id];
        let (kv_layers, ws) = (&mut kv.layers, &mut *ws);
        let mut ops = |step: &B::Step| -> Result<()> {
            b.embedding(&self.embed, step, &mut ws.x)?;
            // Unobserved, each layer's last residual add goes with the next layer's norm.
            let (fuse, layers) = (last_layer.is_none(), kv_layers.len());
            for (i, cache) in kv_layers.iter_mut().enumerate() {
                let residual = (fuse && i > 0, fuse && i + 1 < layers);
                self.layer_step(i, ws, cache, step, token_rows, &mut observer, residual)?;
                if last_layer == Some(i) {
                    return Ok(());
                }
            }
            if rows == 0 {
                return Ok(());
            }
            let hidden = c.hidden_size;
            b.gather_logit_rows(&ws.x, step, hidden, &mut ws.selected)?;
            b.rms_norm(
                &ws.selected,
                &self.final_norm,
                c.rms_norm_eps,
                rows,
                hidden,
                &mut ws.normed,
            )?;
            let head = self.lm_head.as_ref().unwrap_or(&self.embed);
            b.matmul(&ws.normed, head, MatmulRows::plain(rows), &mut ws.logits)
                .map_err(Into::into)
        };
        if last_layer.is_some() {
            // The observer reads inputs back to the host mid-step: nothing to record.
            ops(&step)?;
            return Ok(Vec::new());
        }
        b.queue_step(&step, &key, ops)?;
        Ok(finish(b, &ws.logits, rows, c.vocab_size)?)
    }

    /// Decoder layer `i` over the step's tokens: `ws.x` holds its input and receives its output.
    /// `residual` = (pending, defer): with pending, the input is `ws.x + ws.proj` (the previous
    /// layer deferred its last add, which goes with this layer's norm, one op); with defer, this
    /// layer leaves its output as `ws.x + ws.proj` the same way.
    #[allow(clippy::too_many_arguments)]
    fn layer_step(
        &self,
        i: usize,
        ws: &mut Workspace<B>,
        cache: &mut B::KvCache,
        step: &B::Step,
        rows: MatmulRows,
        observer: &mut Option<&mut (dyn MatmulObserver + Send)>,
        (pending, defer): (bool, bool),
    ) -> Result<()> {
        let n = rows.count;
        let c = &self.config;
        let b = &self.backend;
        let layer = &self.layers[i];
        let (hidden, heads, kv_heads, hd) =
            (c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim);
        let scale = 1.0 / (hd as f32).sqrt();
        let mut watch = |projections: &[&str], input: &B::Buffer, cols: usize| -> Result<()> {
            if let Some(o) = observer.as_deref_mut() {
                let names: Vec<String> = projections
                    .iter()
                    .map(|p| format!("model.layers.{i}.{p}.weight"))
                    .collect();
                o.observe(i, &names, &b.read(input, n * cols)?, n, cols);
            }
            Ok(())
        };
        if pending {
            b.add_rms_norm(
                &mut ws.x,
                &ws.proj,
                &layer.attn_norm,
                c.rms_norm_eps,
                n,
                hidden,
                &mut ws.normed,
            )?;
        } else {
            b.rms_norm(
                &ws.x,
                &layer.attn_norm,
                c.rms_norm_eps,
                n,
                hidden,
                &mut ws.normed,
            )?;
        }
        watch(
            &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
            &ws.normed,
            hidden,
        )?;
        match &layer.qk_norms {
            Some((q_norm, k_norm)) => {
                b.matmul(&ws.normed, &layer.q, rows, &mut ws.unnormed)?;
                b.rms_norm(
                    &ws.unnormed,
                    q_norm,
                    c.rms_norm_eps,
                    n * heads,
                    hd,
                    &mut ws.q,
                )?;
                b.matmul(&ws.normed, &layer.k, rows, &mut ws.unnormed)?;
                b.rms_norm(
                    &ws.unnormed,
                    k_norm,
                    c.rms_norm_eps,
                    n * kv_heads,
                    hd,
                    &mut ws.k,
                )?;
                b.matmul(&ws.normed, &layer.v, rows, &mut ws.v)?;
            }
            None => b.matmul_many(
                &ws.normed,
                &[&layer.q, &layer.k, &layer.v],
                rows,
                &mut [&mut ws.q, &mut ws.k, &mut ws.v],
            )?,
        }
        b.rope_attention(
            &mut ws.q,
            &mut ws.k,
            &ws.v,
            cache,
            step,
            heads,
            kv_heads,
            hd,
            &self.rope_table,
            scale,
            &mut ws.attn,
        )?;
        watch(&["self_attn.o_proj"], &ws.attn, heads * hd)?;
        b.matmul(&ws.attn, &layer.o, rows, &mut ws.proj)?;
        b.add_rms_norm(
            &mut ws.x,
            &ws.proj,
            &layer.mlp_norm,
            c.rms_norm_eps,
            n,
            hidden,
            &mut ws.normed,
        )?;
        watch(&["mlp.gate_proj", "mlp.up_proj"], &ws.normed, hidden)?;
        b.matmul_swiglu(
            &ws.normed,
            &layer.gate,
            &layer.up,
            rows,
            &mut ws.gate,
            &mut ws.up,
            &mut ws.act,
        )?;
        watch(&["mlp.down_proj"], &ws.act, c.intermediate_size)?;
        b.matmul(&ws.act, &layer.down, rows, &mut ws.proj)?;
        if !defer {
            b.add(&mut ws.x, &ws.proj, n * hidden)?;
        }
        Ok(())
    }
}
