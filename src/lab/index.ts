/**
 * kvmmem/lab: whole deployments to develop and test against. `ModelLab` runs
 * one in this process on the hypercall model: the tool's IntrospectionServer,
 * a model host with its VMs connected over real sockets, sessions on the model
 * /dev/kvmmem. `Lab` boots the real one (docs/lab.md): a live target VM and an
 * introspector VM on stock QEMU, commands run inside with `lab.run()`;
 * `LabClient` reaches a lab another process owns (`kvmmem lab up`).
 */
export { ModelLab, type LabOptions, type LabVm, type LabVmSpec } from './model-lab.js';
export {
  Lab, exitCodeOf, type LabInfo, type LabRunOptions, type LabStartOptions, type StartHost, type LabHostStartOptions, type LabHostHandle,
} from './lab.js';
export { LabClient, spawnLabDaemon } from './client.js';
export { LabError, LAB_PROVISION_COMMAND } from './errors.js';
export { labAvailable, type LabAvailability } from './vms.js';
export { listLabs, stopLab, DEFAULT_LAB_NAME } from './run-dir.js';
