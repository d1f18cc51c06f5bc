//! `marlin generate`: one prompt in, streamed text out.

use crate::session::{ModelArgs, SamplingArgs, Session};
use anyhow::Result;
use clap::Args;
use marlin_engine::{Event, Finish, Request};
use marlin_model::ChatMessage;
use std::io::Write;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt text
    #[arg(long, short)]
    pub prompt: String,
    /// Wrap the prompt in the model's chat template as a user message
    #[arg(long)]
    pub chat: bool,
    /// Most tokens to generate
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Stop when this text appears (repeatable); it is not printed
    #[arg(long)]
    pub stop: Vec<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Print one JSON object (text, token ids, finish reason, usage) instead of streaming
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let mut session = Session::load(&args.model)?;
    let prompt = if args.chat {
        let text = session
            .chat_template()?
            .render(&[ChatMessage::new("user", args.prompt.clone())], true)?;
        session.engine.tokenizer().encode(&text, false)?
    } else {
        session.engine.tokenizer().encode(&args.prompt, true)?
    };
    let request = Request {
        prompt,
        sampling: args.sampling.params(&session.generation),
        max_tokens: args.max_tokens,
        stop: args.stop.clone(),
        stop_token_ids: session.stop_token_ids.clone(),
    };
    let mut text = String::new();
    let mut finish: Option<Finish> = None;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for events in session.engine.generate(request)? {
        for event in events? {
            match event {
                Event::Text(piece) => {
                    if !args.json {
                        out.write_all(piece.as_bytes())?;
                        out.flush()?;
                    }
                    text.push_str(&piece);
                }
                Event::Finished(f) => finish = Some(f),
            }
        }
    }
    let finish = finish.expect("a generation ends with a Finished event");
    if args.json {
        let json = serde_json::json!({
            "text": text,
            "token_ids": finish.token_ids,
            "finish_reason": finish.reason,
            "prompt_tokens": finish.prompt_tokens,
            "completion_tokens": finish.completion_tokens,
        });
        writeln!(out, "{json}")?;
    } else {
        writeln!(out)?;
    }
    Ok(())
}
