/**
 * kvmmem/yara: YARA rules (YARA-X) over guest-physical memory, live and
 * zero-copy through mapped pages. A separate entry so that importing kvmmem
 * does not load the engine's native module.
 */
export { compileRules, loadRuleFiles, YaraRules, YaraCompileError, type RuleSource } from './rules.js';
export { yaraScan, type YaraHit, type YaraScanOptions, type YaraScanResult, type YaraProgress } from './scan.js';
