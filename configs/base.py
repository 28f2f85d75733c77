"""Every default of experiments.run, one line each. Experiment configs override what they change.

Values are the reference scripts' (method.md §3, §7): 4 users, 20 rounds x 10 local steps,
64 x 128 windows, lr 2e-3, router 10 steps every 30, rank 8, alpha 16.
"""
import ml_collections

from comigs_jax.data.config import default_data_config


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.method = arg or "comigs"  # local | fedavg | fedprox | centralized | pfedmoe | comigs | comigs_2g | comigs_2s | comigs_train | comigs_uniform | comigs_user_router | fedavg_moe | local_moe | fedavg_moe_train | local_moe_train | ffa_lora | ffa_lora_77efb25 | fedsa_lora | pcl | pcl_every_round | hetlora | flexlora
    c.methods = ""  # comparison: comma-separated methods run on the same data, seeds and base ("" = just `method`)
    c.seed = 42  # seeds initialisation, batch sampling and participation
    c.seeds = ""  # comparison: comma-separated seeds ("" = just `seed`)
    c.base = "gpt2"  # frozen base: HF GPT-2 or Llama directory or hub id | smollm2-135m (the pip-installed GGUF) | a Llama .gguf path | "pretrain" = train a small GPT-2 on the synthetic base chain (data.synthetic.base_knows_shared)
    c.resume = True  # continue from the workdir's latest checkpoint; False starts fresh (never over another config's run)

    c.model = ml_collections.ConfigDict()
    c.model.dtype = "float32"  # activation dtype: float32 | bfloat16 (parameters stay float32) | float64 (JAX_ENABLE_X64=1)
    c.model.n_experts = 2  # experts per user E (E_max when expert_counts is set)
    c.model.expert_counts = ""  # per-user expert counts, comma-separated, e.g. "2,4,4,4" ("" = n_experts for all)
    c.model.n_generalists = 1  # expert slots [0, n_generalists) are generalists
    c.model.top_k = 2  # experts per token (k_i = min(top_k, E_i))
    c.model.rank = 8  # LoRA rank of each expert (the padded rank when model.ranks is set)
    c.model.ranks = ""  # per-user expert LoRA ranks, comma-separated, each <= model.rank, e.g. "16,32,32,32" (HetLoRA/FlexLoRA; "" = model.rank for all)
    c.model.attn_rank = 8  # LoRA rank on attention c_attn / c_proj (the reference fixes 8); 0 = no attention LoRA
    c.model.alpha = 16.0  # LoRA alpha
    c.model.lora_scaling = "rslora"  # rslora: s = alpha/sqrt(r) (reference) | lora: s = alpha/r (peft)
    c.model.dropout = 0.0  # LoRA dropout
    c.model.lb_input = "block_output"  # load-balancing loss on the block output (reference, Q1) | router_input
    c.model.router_kind = "learned"  # a learned router's kind: learned (bias-free linear, GPT-2 reference) | noisy_topk (Llama only: 2d42464's tanh-MLP noisy top-k gate with its cv^2 balance loss)
    c.model.importance = 0.5  # expert0_importance of the load-balancing factors (scripts: 0.5)
    c.model.remat = "none"  # recomputed in the backward instead of kept: none | block (each transformer block) | moe (the experts' [E, N, 4d] tensors)
    c.model.head_block = 2048  # vocabulary block of the loss and evaluation cross-entropy: never a [batch, seq, vocab] logits array (0 = full logits; 2048 is the fastest on CPU, docs/benchmarks.md)

    c.train = ml_collections.ConfigDict()
    c.train.rounds = 20  # communication rounds R
    c.train.local_steps = 10  # expert steps per round S
    c.train.batch_size = 64  # windows per step
    c.train.seq_len = 128  # tokens per window
    c.train.lr = 2e-3  # expert lr, cosine to lr * lr_final_ratio over R * S steps
    c.train.lr_final_ratio = 0.1  # cosine floor
    c.train.router_lr = 2e-3  # router lr (constant)
    c.train.weight_decay = 0.01  # AdamW decoupled weight decay
    c.train.router_every = 30  # a router phase after every router_every-th expert step (global count)
    c.train.router_steps = 10  # router steps per phase
    c.train.lb_weight = 0.01  # weight of the load-balancing loss
    c.train.user_chunk = 0  # vmap mode: each device trains and scores its users this many at a time (0 = all at once); live activations are a chunk's, not every user's
    c.train.faithful = False  # reproduce the reference's gradient leaks D1, D2 (method.md §8)
    c.train.prune_lambda = 0.0  # weight of the rank-tail pruning regulariser sum |A[:, q:]| |B[q:, :]|, q = floor(0.99 r) (HetLoRA/FlexLoRA/FFA-LoRA scripts; 0 = off)
    c.train.prox_mu = 0.0  # FedProx (Li et al., MLSys 2020): mu/2 ||w - w_round_start||^2 on the shared leaves in every local expert step, any method that shares leaves (method=fedprox: FedAvg with it, needs > 0); 0 = off; may differ between federations of one program

    c.federation = ml_collections.ConfigDict()
    c.federation.mode = "vmap"  # vmap: all users in one program | loop: a Python loop over users (same math)
    c.federation.shard = True  # split users over all devices (mesh axis `users`); padding users are masked
    c.federation.weighting = "uniform"  # aggregation weights: uniform (reference) | tokens (by training-set size)
    c.federation.participation = 1.0  # fraction of users that train in a round (q)
    c.federation.sampling = "fixed"  # fixed: round(q N) users drawn without replacement each round | poisson: each user independently with probability q
    c.federation.dropout = 0.0  # probability that a participating user stops at a uniformly random local step of a round (keeps its steps, skips that round's aggregation); in [0, 1)
    c.federation.sit_out = "skip"  # a user that does not participate in a round: skip (no local steps) | train (all its local steps, no upload: separates compute from collaboration)
    c.federation.stack_seeds = False  # True: a method's seeds (config seeds) train as independent federations of ONE program (one compile); the same per-seed folders and results as separate runs

    c.server = ml_collections.ConfigDict()  # a server optimizer after the aggregation (Reddi et al., ICLR 2021): x <- x + opt(x - mean of the uploads); HetLoRA: x the padded-rank global, FlexLoRA: x each module's dW (product space); not PCL or one-round methods
    c.server.optimizer = "none"  # none: the aggregate is the new value (the mean) | sgd (FedAvgM with server.momentum > 0; lr 1, momentum 0 = the mean) | adam (FedAdam) | yogi (FedYogi) | adagrad (FedAdagrad): Algorithm 2, m/(sqrt(v) + tau), v starts at tau^2
    c.server.lr = 1.0  # server learning rate eta (> 0); may differ between federations of one program (an lr sweep as one program)
    c.server.momentum = 0.0  # sgd: server momentum beta in [0, 1) (FedAvgM; Hsu et al. 2019 use 0.9)
    c.server.b1 = 0.9  # adam / yogi / adagrad: first-moment decay beta1 in [0, 1)
    c.server.b2 = 0.99  # adam / yogi: second-moment decay beta2 in [0, 1) (adagrad sums the squares)
    c.server.tau = 1e-3  # adam / yogi / adagrad: adaptivity tau > 0 (sqrt(v) + tau; v starts at tau^2)

    c.dp = ml_collections.ConfigDict()  # user-level differential privacy of the shared leaves (DP-FedAvg, McMahan et al. 2018; the `dp` extra)
    c.dp.enabled = False  # True: each upload's update of the shared leaves clipped to dp.clip, Gaussian noise on their sum, / expected participants (before any server.optimizer step); epsilon at dp.delta each round (methods whose server is the mean)
    c.dp.clip = 1.0  # C: the L2 bound of a user's update over all its shared leaves (> 0; inf: no clipping)
    c.dp.noise_multiplier = 1.0  # sigma: the noise on the sum has std sigma * C (>= 0); replaced by the calibrated one when dp.target_epsilon > 0
    c.dp.delta = 1e-5  # delta of the reported (epsilon, delta), in (0, 1); below 1 / data.n_users
    c.dp.target_epsilon = 0.0  # > 0: calibrate sigma before training so that epsilon after train.rounds rounds is at most this (RDP accountant); 0: use dp.noise_multiplier

    c.eval = ml_collections.ConfigDict()
    c.eval.protocol = "full"  # full: every non-overlapping window of the split (exact, seed-free) | fixed: n_windows evenly spaced | reference: n_windows random (docs/reproducing.md)
    c.eval.n_windows = 640  # windows per user for fixed / reference (reference: 100 batches x 64 = 6400); unused by full
    c.eval.batch_size = 64  # windows per evaluation batch
    c.eval.zero_shot = False  # also score the base alone before round 1 (every LoRA B starts at 0): results' zero_shot_ppl, one more evaluation
    c.eval.every_rounds = 2  # evaluate the local (pre-aggregation) models every k rounds (reference: 20 steps)

    c.pretrain = ml_collections.ConfigDict()  # only for base = "pretrain"
    c.pretrain.n_layer = 2  # layers of the small base
    c.pretrain.n_embd = 128  # width
    c.pretrain.n_head = 4  # heads
    c.pretrain.steps = 600  # full-parameter steps on the synthetic base chain
    c.pretrain.batch_size = 32  # windows per step (seq_len as train.seq_len)
    c.pretrain.lr = 3e-3  # peak lr (warm-up, cosine)
    c.pretrain.tokens = 500_000  # length of the general-chain stream (with pretrain.text: tokens of that text read, at most)
    c.pretrain.text = ""  # "" = the synthetic base chain; a folder of .jsonl/.txt files = pretrain on that text (held-out text of a real corpus, tokenised as data.tokenizer)

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_rounds = 5  # save the whole state every k rounds (and after the last)
    c.checkpoint.max_to_keep = 2  # checkpoints kept
    c.checkpoint.async_save = True  # write in a background thread while the next rounds train (False: wait for each)

    c.distributed = ml_collections.ConfigDict()  # several JAX processes (pod hosts); see experiments/launch_local.py
    c.distributed.mode = "auto"  # auto: initialise when a multi-process launch is detected | always | never
    c.distributed.coordinator_address = ""  # host:port of process 0 ("" = JAX_COORDINATOR_ADDRESS or cluster detection)
    c.distributed.num_processes = 0  # number of processes (0 = JAX_NUM_PROCESSES or cluster detection)
    c.distributed.process_id = -1  # this process's index (-1 = JAX_PROCESS_ID or cluster detection)

    c.output = ml_collections.ConfigDict()
    c.output.figures = True  # write PNG figures
    c.output.progress = True  # tqdm progress bar over rounds
    c.output.routing_tokens = 48  # tokens in the routing picture of a sample test text
    c.output.compilation_cache = True  # JAX's persistent compilation cache in <data.cache_dir>/xla (JAX_COMPILATION_CACHE_DIR wins when set): a rerun, resume or study cell loads the programs an earlier process compiled; False = compile afresh
    c.output.per_user_limit = 64  # above this many users: no per-user TensorBoard tags and no per-user table in results.md (quantiles p10/p50/p90/worst-10 % mean and a histogram instead; results.json and users.csv keep every user); >= 1
    c.output.wandb = False  # also log TensorBoard's numbers, the config and the provenance to Weights & Biases (the `wandb` extra; WANDB_MODE=offline: no account, files in <run>/wandb/)
    c.output.wandb_project = "comigs_jax"  # the W&B project of output.wandb
    c.output.tensorboard = False  # also write the per-round metrics as TensorBoard events in <run>/tensorboard/ (tensorboardX; rewritten from metrics.jsonl on resume)

    c.data = default_data_config()
    c.data.tokenizer = "base"  # the base's own tokenizer (GPT-2 sizes and "pretrain": the bundled GPT-2 BPE); or a tokenizer directory / hub id
    return c
