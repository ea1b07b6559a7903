// The README's quickstart: a whole KVMI deployment on the model, one page mapped live.
import { ModelLab } from '../src/lab/index.js';

const lab = await ModelLab.start({ vms: [{ name: 'guest', memory: 16 << 20 }] });
const guest = lab.modelVm('guest').memory;           // the host side: the VM's RAM
guest.write(0x2000n, Buffer.from('hello, introspector'));

const session = lab.open();                          // one open of /dev/kvmmem (model)
const page = await session.map(lab.vm('guest'), 0x2000n);  // token + KVM_INTRO_MEM_MAP
console.log(page.buffer.toString('latin1', 0, 19));  // zero-copy: the guest's own page
guest.write(0x2000n, Buffer.from('HELLO'));
console.log(page.buffer.toString('latin1', 0, 19));  // live: 'HELLO, introspector'
page.unmap();                                        // KVM_INTRO_MEM_UNMAP
session.close();                                     // release(): nothing stays mapped
await lab.close();
