"""Mutation check: does the test suite notice when the code it guards is broken?

Each entry below breaks one line that carries a method's meaning (the sign of IST's draw weights, the
square in the Fisher, the -100 on prompt labels, the restore steps of the warm-up, ...) and names the
test files that must then fail. The script applies one mutation at a time to the working tree, runs
those tests, restores the file, and reports every mutation the tests did not catch (exit 1 if any).

    python tests/mutation_check.py            # all, ~10 minutes on 2 cores
    python tests/mutation_check.py 0 5 12     # some, by index

Not a pytest file (it rewrites source files while it runs): a developer's check before changing the
tests or the guarded code, not part of CI. A mutation that survives means a test that cannot fail for
that mistake; add the test rather than deleting the entry. Known equivalent mutation left out:
skipping ``SparseDeltaEngine.save_delta``'s write-back (every optimizer step already writes the values
back into the weights, so the saved delta is the same).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (file, original text (must occur exactly once), mutated text, test files that must catch it)
MUTATIONS = [
    ('src/sparsepeft/selection/layers.py',
     'self._draw(torch.sigmoid(-self.scores), self.count)',
     'self._draw(torch.sigmoid(self.scores), self.count)',
     'tests/test_layerwise.py'),
    ('src/sparsepeft/selection/layers.py',
     'slope = p * (1 - p)',
     'slope = p',
     'tests/test_layerwise.py'),
    ('src/sparsepeft/selection/layers.py',
     'advantages = rewards - rewards.mean()',
     'advantages = rewards',
     'tests/test_layerwise.py'),
    ('src/sparsepeft/selection/layers.py',
     'if step % self.config.interval == 0 or not self.current:',
     'if not self.current:',
     'tests/test_layerwise.py'),
    ('src/sparsepeft/selection/layers.py',
     'weights = torch.sigmoid(self.scores)',
     'weights = torch.sigmoid(-self.scores)',
     'tests/test_layerwise.py'),
    ('src/sparsepeft/selection/layers.py',
     'return self.config.strategy == "ist" and step > 0 and step % self.config.probe_interval == 0',
     'return self.config.strategy == "ist" and step % self.config.probe_interval == 0',
     'tests/test_layerwise.py'),
    ('src/sparsepeft/data/multiple_choice.py',
     'hits_norm += _argmax([s / n for s, n in zip(option_scores, lengths)]) == example.answer',
     'hits_norm += _argmax(option_scores) == example.answer',
     'tests/test_multiple_choice.py'),
    ('src/sparsepeft/data/multiple_choice.py',
     'predicted = logits[row, end - option_length - 1:end - 1].log_softmax(-1)',
     'predicted = logits[row, end - option_length:end].log_softmax(-1)',
     'tests/test_multiple_choice.py'),
    ('src/sparsepeft/importance/suppression.py',
     'module.scaling[name] = module.scaling[name] * factor',
     'module.scaling[name] = module.scaling[name]',
     'tests/test_layerwise.py'),
    ('src/sparsepeft/importance/suppression.py',
     'share = label_weight(chunk) if chunk_size is not None else 1.0',
     'share = 1.0',
     'tests/test_layerwise.py'),
    ('src/sparsepeft/importance/fisher.py',
     'total.addcmul_(block, block)',
     'total.add_(block.abs())',
     'tests/test_fisher.py'),
    ('src/sparsepeft/selection/topk.py',
     'threshold = torch.topk(flat, k, sorted=False).values.min()',
     'threshold = torch.topk(flat, k, sorted=False, largest=False).values.max()',
     'tests/test_selection.py'),
    ('src/sparsepeft/engines/sparse_delta.py',
     'values.grad.add_(selected)  # gradient accumulation',
     'values.grad = selected',
     'tests/test_sparse_delta_engine.py'),
    ('src/sparsepeft/engines/dense_mask.py',
     'value.mul_(keep)',
     'pass',
     'tests/test_dense_mask_engine.py'),
    ('src/sparsepeft/engines/dense_mask.py',
     '            flat[index] = flat[index] * (1 - lr * decay)',
     '            param.mul_(1 - lr * decay)',
     'tests/test_dense_mask_engine.py'),
    ('src/sparsepeft/engines/dense_mask.py',
     '        param.grad.view(-1)[index] += decay * param.view(-1)[index]',
     '        param.grad.add_(param, alpha=decay)',
     'tests/test_dense_mask_engine.py'),
    ('src/sparsepeft/importance/rules/embedding.py',
     'summed.index_add_(0, inverse, grads.reshape(-1, width))',
     'summed.index_copy_(0, inverse, grads.reshape(-1, width))',
     'tests/test_fisher.py'),
    ('src/sparsepeft/importance/rules/linear.py',
     'grads["bias"] = DenseGrads(g.sum(dim=1))',
     'grads["bias"] = DenseGrads(g.mean(dim=1))',
     'tests/test_fisher.py'),
    ('src/sparsepeft/selection/ird.py',
     'sizes.append(max(1, math.floor(sizes[-1] * self.sample_shrink)))',
     'sizes.append(sizes[-1])',
     'tests/test_ird.py'),
    ('src/sparsepeft/selection/budget.py',
     'count = max(1, round(self.ratio * num_candidates))',
     'count = max(1, round(self.ratio * num_candidates)) + 1',
     'tests/test_fish_tuning.py tests/test_selection.py'),
    ('src/sparsepeft/data/causal_lm.py',
     '"labels": [-100] * len(prompt_ids) + response_ids})',
     '"labels": prompt_ids + response_ids})',
     'tests/test_data.py tests/test_multiple_choice.py'),
    ('src/sparsepeft/cli/arguments.py',
     '"lora": 1e-3, "peft": 1e-3',
     '"lora": 3e-3, "peft": 1e-3',
     'tests/test_cli_usability.py tests/test_cli_peft.py'),
    ('src/sparsepeft/data/collate.py',
     'batch["position_ids"] = (attention.cumsum(-1) - 1).clamp(min=0)',
     'pass',
     'tests/test_answer_logits.py'),
    ('src/sparsepeft/data/collate.py',
     'keep = min(width, width - first + 1)',
     'keep = min(width, width - first)',
     'tests/test_answer_logits.py'),
    ('src/sparsepeft/data/multiple_choice.py',
     'end = len(ids) if right_padded else logits.shape[1]',
     'end = len(ids)',
     'tests/test_multiple_choice.py'),
    ('src/sparsepeft/engines/layerwise.py',
     '                if not on:\n                    param.grad = None',
     '                pass',
     'tests/test_layerwise.py'),
    ('src/sparsepeft/engines/layerwise.py',
     '                if self.config.optimizer_state == "drop" and not on:',
     '                if False:',
     'tests/test_layerwise.py'),
    ('src/sparsepeft/selection/mask.py',
     '        if self.fingerprint and self.fingerprint != model_fingerprint(model):',
     '        if False:',
     'tests/test_selection.py tests/test_io.py tests/test_cli.py'),
    ('src/sparsepeft/data/collate.py',
     '        if labels is None or labels.dim() != 2 or attention is None:',
     '        if True:',
     'tests/test_answer_logits.py'),
    ('src/sparsepeft/importance/warmup.py',
     '                param.copy_(saved[name])',
     '                pass',
     'tests/test_fish_tuning.py'),
    ('src/sparsepeft/importance/warmup.py',
     '        model.train(was_training)',
     '        pass',
     'tests/test_fish_tuning.py'),
    ('src/sparsepeft/selection/fish_tuning.py',
     '    steps = config.warmup_steps if config.fisher_at == "warmup" else 0',
     '    steps = 0',
     'tests/test_fish_tuning.py'),
    ('src/sparsepeft/importance/warmup.py',
     '            param.requires_grad_(flag)',
     '            pass',
     'tests/test_fish_tuning.py'),
    ('src/sparsepeft/engines/sparse_delta.py',
     '            param.view(-1)[index] = values.to(param.dtype)',
     '            pass',
     'tests/test_sparse_delta_engine.py'),
    ('src/sparsepeft/integrations/trainer.py',
     '                self.mask.save(os.path.join(folder, MASK_FILE))',
     '                pass',
     'tests/test_trainer_integration.py tests/test_fish_tuning.py'),
    # second batch: rules, metrics, losses, the IRD probe, delta checkpoints, adapters, SHiRA masks
    ('src/sparsepeft/importance/rules/normalization.py',
     'x_hat = (x - mean) * torch.rsqrt(var + layer.eps)',
     'x_hat = x * torch.rsqrt(var + layer.eps)',
     'tests/test_fisher.py'),
    ('src/sparsepeft/importance/rules/normalization.py',
     'x.pow(2).mean(dim=reduce_dims, keepdim=True)',
     'x.abs().mean(dim=reduce_dims, keepdim=True)',
     'tests/test_fisher.py'),
    ('src/sparsepeft/data/metrics.py',
     'results[name] = float(matthews_corrcoef(labels, predicted))',
     'results[name] = float(accuracy_score(labels, predicted))',
     'tests/test_data.py'),
    ('src/sparsepeft/data/metrics.py',
     'results[name] = float(pearsonr(predicted, labels)[0]) if np.std(predicted) > 0 else 0.0',
     'results[name] = float(spearmanr(predicted, labels)[0]) if np.std(predicted) > 0 else 0.0',
     'tests/test_data.py'),
    ('src/sparsepeft/importance/losses.py',
     'return nll.sum(-1) / valid.sum(-1).clamp(min=1)',
     'return nll.sum(-1)',
     'tests/test_fisher.py'),
    ('src/sparsepeft/importance/losses.py',
     'shifted_labels = labels[:, 1:]',
     'shifted_labels = labels[:, :-1]',
     'tests/test_fisher.py tests/test_answer_logits.py'),
    ('src/sparsepeft/importance/losses.py',
     'weights = log_probs.detach().exp().sqrt()',
     'weights = log_probs.detach().exp()',
     'tests/test_fisher.py'),
    ('src/sparsepeft/selection/probe.py',
     '                params[name].copy_(value)',
     '                pass',
     'tests/test_ird.py'),
    ('src/sparsepeft/selection/probe.py',
     '        torch.manual_seed(config.seed)',
     '        pass',
     'tests/test_ird.py'),
    ('src/sparsepeft/engines/delta.py',
     'if verify_base and header.get("base_hash") and _base_hash(model, header, whole, entries) != header["base_hash"]:',
     'if False:',
     'tests/test_sparse_delta_engine.py'),
    ('src/sparsepeft/engines/delta.py',
     '            value[index.to(value.device)] = 0',
     '            pass',
     'tests/test_sparse_delta_engine.py'),
    ('src/sparsepeft/adapters/layer.py',
     'return self.up(self.act(self.down(self.dropout(x)))) * self.scaling',
     'return self.up(self.act(self.down(self.dropout(x))))',
     'tests/test_adapters.py tests/test_layerwise.py'),
    ('src/sparsepeft/adapters/layer.py',
     'return _add_to_output(output, self.adapter(source).to(hidden.dtype))',
     'return _add_to_output(output, self.adapter(hidden).to(hidden.dtype))',
     'tests/test_adapters.py'),
    ('src/sparsepeft/selection/shira.py',
     'budget = r * (rows + cols)',
     'budget = r * max(rows, cols)',
     'tests/test_shira.py'),
    ('src/sparsepeft/selection/shira.py',
     'kept = global_topk({name: fisher[name].detach()}, budget)[name]',
     'kept = global_topk({name: -fisher[name].detach()}, budget)[name]',
     'tests/test_shira.py'),
    ('src/sparsepeft/utils/distributed.py',
     '    if len(set(values)) > 1:',
     '    if False:',
     'tests/test_distributed.py'),
    # shared-prompt option scoring: the options' positions continue the prompt's, and the first option token
    # is predicted by the prompt's last position
    ('src/sparsepeft/data/multiple_choice.py',
     'positions = prompt_mask.sum(-1)[rows, None] + torch.arange(option_ids.shape[1], device=device)',
     'positions = torch.arange(option_ids.shape[1], device=device).expand(len(rows), -1)',
     'tests/test_multiple_choice.py'),
    ('src/sparsepeft/data/multiple_choice.py',
     'scores[e][o] = float(first[q, ids[0]] + later.sum())',
     'scores[e][o] = float(later.sum())',
     'tests/test_multiple_choice.py'),
    ('src/sparsepeft/data/multiple_choice.py',
     'return list(prompt) if len(prompts) == 1 and prompt else None',
     'return list(prompt) if prompt else None',
     'tests/test_multiple_choice.py'),

]


def run(index: int) -> bool:
    """Apply mutation ``index``, run its tests; True if they caught it. The file is always restored."""
    path, original, mutated, tests = MUTATIONS[index]
    target = ROOT / path
    source = target.read_text()
    if source.count(original) != 1:
        raise SystemExit(f"mutation {index}: the text to mutate occurs {source.count(original)} times in {path} "
                         "(the code changed): update the entry")
    target.write_text(source.replace(original, mutated))
    try:
        finished = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
                                   *tests.split()], cwd=ROOT, capture_output=True, text=True)
    finally:
        target.write_text(source)
    last = (finished.stdout.strip().splitlines() or ["(no output)"])[-1]
    caught = finished.returncode != 0
    print(f"{index:2d} {'caught  ' if caught else 'SURVIVED'} {path}: {mutated.strip()[:60]!r} | {last}", flush=True)
    return caught


def main() -> None:
    indices = [int(a) for a in sys.argv[1:]] or range(len(MUTATIONS))
    survivors = [i for i in indices if not run(i)]
    print(f"{len(list(indices)) - len(survivors)} of {len(list(indices))} mutations caught"
          + (f"; survived: {survivors}" if survivors else ""))
    sys.exit(1 if survivors else 0)


if __name__ == "__main__":
    main()
