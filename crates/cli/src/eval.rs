//! `marlin eval`: perplexity of a text, and with a reference model the KL divergence and top-1
//! agreement of the token distributions.

use crate::session::{ModelArgs, Session};
use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use marlin_engine::eval::evaluate;
use marlin_kernels::DenseFormat;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The model whose distributions are the reference (e.g. the unquantized model)
    #[arg(long)]
    pub reference: Option<String>,
    /// Weight precision of the reference model
    #[arg(long, default_value = "f32", value_parser = crate::session::parse_dtype)]
    pub reference_dtype: DenseFormat,
    /// The text to score
    #[arg(long)]
    pub file: PathBuf,
    /// Window length in tokens; the second half of each window is scored
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Score at most this many windows
    #[arg(long)]
    pub chunks: Option<usize>,
    /// Print one JSON object
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: EvalArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("cannot read {}", args.file.display()))?;
    let mut session = Session::load(&args.model)?;
    let mut reference = match &args.reference {
        Some(name) => Some(Session::load(&ModelArgs::plain(
            Some(name.clone()),
            args.reference_dtype,
            args.model.threads,
        ))?),
        None => None,
    };
    let tokens = session.engine.tokenizer().encode(&text, true)?;
    if let Some(r) = &reference {
        let theirs = r.engine.tokenizer().encode(&text, true)?;
        anyhow::ensure!(
            theirs == tokens,
            "the model and the reference tokenize the text differently"
        );
    }
    let bar = ProgressBar::new(0).with_style(ProgressStyle::with_template(
        "{msg} {bar:40} {pos}/{len} windows [{elapsed_precise}]",
    )?);
    bar.set_message("scoring");
    let stats = evaluate(
        &mut session.engine,
        reference.as_mut().map(|r| &mut r.engine),
        &tokens,
        args.ctx,
        args.chunks,
        |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        },
    )?;
    bar.finish_and_clear();
    let report = stats.report();
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    println!("model          {}", session.files_path.display());
    println!(
        "scored tokens  {} (ctx {}, {} tokens in the text)",
        report.scored_tokens,
        args.ctx,
        tokens.len()
    );
    println!(
        "perplexity     {:.4} ± {:.4}",
        report.perplexity, report.perplexity_se
    );
    if let (Some(kld), Some(kld_se), Some(top1), Some(top1_se)) = (
        report.mean_kld,
        report.mean_kld_se,
        report.same_top1,
        report.same_top1_se,
    ) {
        println!("mean KLD       {kld:.6} ± {kld_se:.6}");
        println!(
            "same top-1     {:.2} ± {:.2} %",
            100.0 * top1,
            100.0 * top1_se
        );
    }
    Ok(())
}
