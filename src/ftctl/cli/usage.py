"""The text of ftctl --help."""

USAGE = """\
usage: ftctl [--debug] <command> [args]

commands:
  train [-m] [--cfg job] [--dry-run] [recipe=NAME] [group=option ...] [key=value ...]
        fine-tune; -m runs a sweep (e.g. peft.r=4,8,16); --cfg job prints the composed config;
        --dry-run prints the torchrun command of a multi-process run (launcher.*) without running it;
        config_file=FILE [key=value ...] trains on a saved config (a run's config.yaml)
  eval METRIC [METRIC ...] run=DIR|model=DIR [compare=base] [shots=K] [split=S] [limit=N] [key=value ...]
        generate on held-out rows and score (exact_match rouge rougeL bleu accuracy f1 precision recall
        perplexity); a classifier (task=classify): accuracy f1 precision recall and the confusion matrix
  merge run=DIR [output=DIR] [dtype=float32|bfloat16|float16] [overwrite=true] [trust_remote_code=true]
        fold a LoRA-family adapter into the base weights; checks logits, writes a standalone model folder
  quantize model=DIR method=nf4|int8|int8_weight_only|int4_weight_only|bitdelta [base=DIR] [output=DIR]
        write a quantized copy; prints size before/after and held-out perplexity before/after
  generate run=DIR|model=DIR prompt="..."|prompts=FILE [max_new_tokens=N] [do_sample=true] [output=FILE]
        [overwrite=true]
        generate for one prompt or a file of prompts, wrapped as the run was trained (raw=true: as is)
  chat run=DIR|model=DIR [system="..."] [do_sample=true]
        talk to the model in the terminal, answers streamed (lines piped in are user turns)
  report run=DIR [output=FILE] [overwrite=true] [examples=5]
        plots/ and one self-contained report.html for a run directory or a sweep folder
  sweep report DIR [metric=NAME]
        the table of a sweep's trials (best marked), DIR/report.md, report.csv and plots/sweep_*.png
  runs [DIR ...] [status=S] | runs compare RUN RUN [...]
        list the runs under a folder (default outputs/ and multirun/), or their config differences and metrics
  plan [recipe=NAME] [key=value ...] [devices=N] [strategy=S] [tokens_per_s=X] | plan run=DIR
        estimate memory (weights, gradients, optimizer, activations) and compute without loading weights;
        run=DIR puts the run's measured peak memory and throughput beside the estimate
  data preview [recipe=NAME] [n=3] [split=train|validation|test] [key=value ...]
        show rendered examples (trained tokens marked) and token statistics, without training
  recipes
        list the recipes with a one-line description each
  methods
        list the adaptation methods (peft=NAME) with a one-line description each

config groups: model data template peft quant precision trainer distributed
examples:
  ftctl train recipe=qlora_llama
  ftctl train recipe=lora_smollm2 trainer.max_steps=50 output_dir=outputs/try
  ftctl train -m recipe=lora_smollm2 peft.r=4,8,16,32
  ftctl train -m recipe=lora_smollm2 hydra/sweeper=optuna hydra.sweeper.n_trials=6 'trainer.lr=interval(1e-4,1e-3)' 'peft.r=choice(4,8,16)'
  ftctl eval exact_match rougeL run=outputs/try compare=base
options:
  --debug   show Python tracebacks (also FTCTL_DEBUG=1)
a recipe file is untrusted data (no hydra.*, no resolvers); a non-run folder is never written over; one writer
per run directory; trust_remote_code=true (eval, merge, generate, chat) only from the command line
"""
