# kvmmem: truth lines for the Linux views (src/os/linux), sourced by the live
# target's /init before "KVMMEM-TRUTH ready". test/linux-views.test.ts packs it
# (with modules of the booted kernel when the cache has them) into an initramfs
# appended to the target's. Every line: "KVMMEM-TRUTH <key> <value>".
if [ -f /kmods/order ]; then
  for m in $(cat /kmods/order); do
    insmod "/kmods/$m" 2>/dev/null && echo "KVMMEM-TRUTH insmod $m"
  done
fi
# Background processes with known argv and environment.
env -i KVMMEM_ROLE=sleeper KVMMEM_TOKEN=a1b2c3 PATH=/bin sleep 86400 &
KT_P1=$!
sh -c 'while :; do sleep 3600; done' kvmmem-loop alpha 'beta gamma' &
KT_P2=$!
for KT_P in $KT_P1 $KT_P2; do
  KT_I=0
  # until the child has exec'd (its comm is no longer init's)
  while [ "$KT_I" -lt 200 ] && [ "$(cat /proc/$KT_P/comm 2>/dev/null)" = init ]; do usleep 10000; KT_I=$((KT_I+1)); done
  echo "KVMMEM-TRUTH argv $KT_P $(od -An -tx1 -v /proc/$KT_P/cmdline | tr -d ' \n')"
  echo "KVMMEM-TRUTH env $KT_P $(od -An -tx1 -v /proc/$KT_P/environ | tr -d ' \n')"
done
while IFS= read -r KT_L; do echo "KVMMEM-TRUTH maps $KT_P1 $KT_L"; done < /proc/$KT_P1/maps
echo "KVMMEM-TRUTH uname_r $(uname -r)"
echo "KVMMEM-TRUTH uname_v $(uname -v)"
echo "KVMMEM-TRUTH uname_n $(uname -n)"
echo "KVMMEM-TRUTH uname_m $(uname -m)"
while IFS= read -r KT_L; do echo "KVMMEM-TRUTH module $KT_L"; done < /proc/modules
grep -v '\[' /proc/kallsyms > /tmp/kallsyms.core
echo "KVMMEM-TRUTH kallsyms_count $(wc -l < /tmp/kallsyms.core)"
echo "KVMMEM-TRUTH kallsyms_md5 $(md5sum < /tmp/kallsyms.core | cut -d' ' -f1)"
head -n 2 /tmp/kallsyms.core | while IFS= read -r KT_L; do echo "KVMMEM-TRUTH kallsyms_line $KT_L"; done
tail -n 2 /tmp/kallsyms.core | while IFS= read -r KT_L; do echo "KVMMEM-TRUTH kallsyms_line $KT_L"; done
rm -f /tmp/kallsyms.core
for KT_S in /proc/[0-9]*/stat; do IFS= read -r KT_L < "$KT_S" 2>/dev/null && echo "KVMMEM-TRUTH stat $KT_L"; done
echo "KVMMEM-TRUTH uptime $(cat /proc/uptime)"
dmesg | tail -n 8 | while IFS= read -r KT_L; do echo "KVMMEM-TRUTH dmesg $KT_L"; done
